"""Tokenization: the DPO paper's rules ("reference") and TRL 1.16's DPOTrainer ("joint").

Reference cases write the expected ids by applying the paper's rules by hand to token
pieces; joint cases run TRL's own `DPOTrainer._prepare_dataset` (on a stand-in `self`
holding only the tokenizer) and `DataCollatorForPreference` on the same records.
"""

import logging
import types

import datasets
import pytest
from data_helpers import build_tokenizer
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

from dpo_jax.data import formats
from dpo_jax.data.examples import (
    BadRecordCounter,
    Location,
    PreferenceExample,
    RecordError,
    SFTExample,
    TokenizedPair,
)
from dpo_jax.data.tokenize import (
    TokenizeConfig,
    TokenizeStats,
    load_tokenizer,
    pad_id_of,
    tokenize_examples,
    tokenize_pair,
    tokenize_sequence,
)

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Adds BOS like Llama."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_bos"), add_bos=True)


@pytest.fixture(scope="module")
def tok_nobos(tmp_path_factory):
    """Adds nothing, like GPT-2 / Pythia (the paper's models)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_nobos"), add_bos=False)


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


HH_MULTI = PreferenceExample(
    "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:",
    " Why did the chicken cross the road?",
    " No.",
)
HH_SPACES = PreferenceExample(
    "\n\nHuman:  spaced   out \n\nAssistant:", "  I think so.\n", "  I don't."
)


# ----------------------------------------------------------------------------- reference


def test_load_tokenizer_from_local_dir(tmp_path, monkeypatch):
    build_tokenizer(tmp_path)
    t = load_tokenizer(str(tmp_path))
    assert t.eos_token == "<|eos|>" and t("x")["input_ids"][0] == t.bos_token_id
    assert pad_id_of(t) == t.pad_token_id == 0 and pad_id_of(object()) == 0
    # Remote code is refused explicitly, not by relying on transformers' default.
    from transformers import AutoTokenizer

    seen = {}
    real = AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(str(tmp_path))
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


def test_missing_tokenizer_directory_is_named(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(FileNotFoundError, match=f"tokenizer directory '{missing}' does not exist"):
        load_tokenizer(missing)


@pytest.mark.parametrize("example", [HH_MULTI, HH_SPACES])
def test_reference_no_truncation(tok_nobos, example):
    eos = tok_nobos.eos_token_id
    cfg = TokenizeConfig("reference", max_length=128, max_prompt_length=64)
    got = tokenize_pair(example, tok_nobos, cfg)
    assert got == TokenizedPair(
        enc(tok_nobos, example.prompt),
        enc(tok_nobos, example.chosen) + [eos],
        enc(tok_nobos, example.rejected) + [eos],
    )


def test_reference_keep_end_truncates_prompt_only(tok_nobos):
    eos = tok_nobos.eos_token_id
    p = enc(tok_nobos, HH_MULTI.prompt)
    c = enc(tok_nobos, HH_MULTI.chosen) + [eos]
    r = enc(tok_nobos, HH_MULTI.rejected) + [eos]
    longer = max(len(c), len(r))
    mpl = len(p) - 3
    max_length = len(p) + longer - 1  # one token too long: the prompt is cut to mpl
    assert mpl + longer <= max_length  # ... which is enough, responses stay whole
    cfg = TokenizeConfig("reference", max_length, mpl, "keep_end")
    stats = TokenizeStats()
    got = tokenize_pair(HH_MULTI, tok_nobos, cfg, stats)
    assert got == TokenizedPair(p[-mpl:], c, r)
    assert stats.summary() == {"prompt_truncated": 1}


def test_reference_keep_start_truncates_prompt_and_responses(tok_nobos):
    eos = tok_nobos.eos_token_id
    p = enc(tok_nobos, HH_MULTI.prompt)
    c = enc(tok_nobos, HH_MULTI.chosen) + [eos]
    r = enc(tok_nobos, HH_MULTI.rejected) + [eos]
    mpl = 4
    max_length = mpl + len(c) - 2  # still too long after the prompt cut
    assert len(r) < max_length - mpl < len(c)
    cfg = TokenizeConfig("reference", max_length, mpl, "keep_start")
    got = tokenize_pair(HH_MULTI, tok_nobos, cfg)
    # the chosen loses its last 2 tokens (incl. EOS); the short rejected is untouched
    assert got == TokenizedPair(p[:4], c[: max_length - 4], r)
    assert got.chosen_ids[-1] != eos and got.rejected_ids[-1] == eos


def test_reference_prompt_cut_only_when_too_long(tok_nobos):
    # The paper cuts the prompt to max_prompt_length only if prompt + longer response
    # exceeds max_length, even when the prompt is longer than max_prompt_length.
    eos = tok_nobos.eos_token_id
    p = enc(tok_nobos, HH_MULTI.prompt)
    c = enc(tok_nobos, HH_MULTI.chosen) + [eos]
    cfg = TokenizeConfig("reference", len(p) + len(c), 2, "keep_end")
    assert tokenize_pair(HH_MULTI, tok_nobos, cfg).prompt_ids == p


def test_reference_bos_counts_in_prompt_budget(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    p = enc(tok, HH_MULTI.prompt)
    c = enc(tok, HH_MULTI.chosen) + [eos]
    r = enc(tok, HH_MULTI.rejected) + [eos]
    full = tokenize_pair(HH_MULTI, tok, TokenizeConfig("reference", 256, 64))
    assert full == TokenizedPair([bos] + p, c, r)
    mpl = 6
    cfg = TokenizeConfig("reference", mpl + len(c), mpl, "keep_end")
    got = tokenize_pair(HH_MULTI, tok, cfg)
    assert got == TokenizedPair([bos] + p[-(mpl - 1) :], c, r)  # BOS kept, end of prompt kept
    cfg = TokenizeConfig("reference", mpl + len(c), mpl, "keep_start")
    assert tokenize_pair(HH_MULTI, tok, cfg).prompt_ids == [bos] + p[: mpl - 1]


@pytest.mark.parametrize("mode", ["reference", "joint"])
def test_bos_never_twice(tok, mode):
    ex = PreferenceExample("<|bos|>Question: what color is the sky?", " blue", " green")
    got = tokenize_pair(ex, tok, TokenizeConfig(mode, 64, 32))
    assert got.prompt_ids[0] == tok.bos_token_id and got.prompt_ids[1] != tok.bos_token_id
    assert got.prompt_ids.count(tok.bos_token_id) == 1


def test_templated_text_gets_no_extra_special_tokens(tok):
    rec = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    ex = formats.parse_preference(rec, tokenizer=tok)
    got = tokenize_pair(ex, tok, TokenizeConfig("reference", 64, 32))
    assert got.prompt_ids == enc(tok, ex.prompt)  # the template's own BOS, once
    assert got.chosen_ids == enc(tok, ex.chosen)  # ends with <|im_end|>\n, no EOS appended


def test_sequence_equals_paper_sft_mode(tok_nobos):
    # The paper's SFT mode calls the pair code with chosen = rejected = the target.
    ex = SFTExample(HH_MULTI.prompt, HH_MULTI.chosen)
    for cfg in [TokenizeConfig("reference", 20, 8, "keep_end"), TokenizeConfig("joint", 40)]:
        seq = tokenize_sequence(ex, tok_nobos, cfg)
        pair = tokenize_pair(
            PreferenceExample(ex.prompt, ex.completion, ex.completion), tok_nobos, cfg
        )
        assert (seq.prompt_ids, seq.completion_ids) == (pair.prompt_ids, pair.chosen_ids)


# ----------------------------------------------------------------------------- joint vs TRL


def trl_tokenize(record, tokenizer, max_length):
    """TRL 1.16's own preprocessing + collator truncation; None if TRL drops the pair."""
    fake_self = types.SimpleNamespace(_tokenizer=tokenizer)
    args = types.SimpleNamespace(
        dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start"
    )
    ds = DPOTrainer._prepare_dataset(
        fake_self, datasets.Dataset.from_list([record]), tokenizer, args, "train"
    )
    if len(ds) == 0:
        return None
    row = {k: ds[0][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)(
        [row]
    )
    out = []
    for i in range(2):  # chosen row, rejected row
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        mask = batch["completion_mask"][i, :n].tolist()
        out.append((ids[: mask.index(1)], ids[mask.index(1) :]))
    assert out[0][0] == out[1][0]  # shared prompt
    return TokenizedPair(out[0][0], out[0][1], out[1][1])


STRING_RECORDS = [
    {"prompt": HH_MULTI.prompt, "chosen": HH_MULTI.chosen, "rejected": HH_MULTI.rejected},
    {"prompt": HH_SPACES.prompt, "chosen": HH_SPACES.chosen, "rejected": HH_SPACES.rejected},
    # the prompt ends mid-word: " sk" + "y" merge into " sky" across the boundary
    {
        "prompt": "Question: what color is the sk",
        "chosen": "y? the sky is blue.",
        "rejected": "y? It is green.",
    },
    {
        "prompt": "The quick brown fox",
        "chosen": " jumps over the lazy dog.<|eos|>",
        "rejected": " sleeps.",
    },  # EOS already present: not appended twice
    {"chosen": "I think that is a good idea.", "rejected": "I think that is green."},
]


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("max_length", [12, 24, 128])
@pytest.mark.parametrize("index", range(len(STRING_RECORDS)))
def test_joint_matches_trl_dpo_trainer(tok, tok_nobos, add_bos, max_length, index):
    tokenizer = tok if add_bos else tok_nobos
    record = STRING_RECORDS[index]
    expected = trl_tokenize(record, tokenizer, max_length)
    example = formats.parse_preference(record)
    cfg = TokenizeConfig("joint", max_length=max_length)
    if expected is None:
        with pytest.raises(RecordError, match="no_room_for_response"):
            tokenize_pair(example, tokenizer, cfg)
    else:
        assert tokenize_pair(example, tokenizer, cfg) == expected


def test_joint_conversational_matches_trl(tok):
    record = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    example = formats.parse_preference(record, tokenizer=tok)
    for max_length in (16, 36, 64):  # TRL drops the pair / cuts responses / keeps all
        expected = trl_tokenize(record, tok, max_length)
        cfg = TokenizeConfig("joint", max_length=max_length)
        if expected is None:
            assert max_length == 16
            with pytest.raises(RecordError, match="no_room_for_response"):
                tokenize_pair(example, tok, cfg)
        else:
            assert tokenize_pair(example, tok, cfg) == expected


def test_joint_counts_boundary_merge(tok, caplog):
    ex = formats.parse_preference(STRING_RECORDS[2])
    stats = TokenizeStats()
    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        for _ in range(3):
            got = tokenize_pair(ex, tok, TokenizeConfig("joint", max_length=64), stats)
    assert stats.summary() == {"boundary_merge": 3, "prompt_boundary_moved": 3}
    assert sum("boundary" in r.message for r in caplog.records) == 2  # each warned once
    full = enc(tok, ex.prompt + ex.chosen + tok.eos_token)
    assert got.prompt_ids + got.chosen_ids == [tok.bos_token_id] + full
    assert len(got.prompt_ids) < 1 + len(enc(tok, ex.prompt))  # " sk" moved to the response
    # The reference mode keeps the prompt's own tokens instead.
    ref = tokenize_pair(ex, tok, TokenizeConfig("reference", 64, 32))
    assert ref.prompt_ids == [tok.bos_token_id] + enc(tok, ex.prompt)
    assert ref.prompt_ids + ref.chosen_ids != got.prompt_ids + got.chosen_ids


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mode", ["reference", "joint"])
def test_eos_inside_text_is_an_error(tok, mode):
    ex = PreferenceExample("Q", " yes<|eos|> and more", " no")
    with pytest.raises(RecordError) as info:
        tokenize_pair(ex, tok, TokenizeConfig(mode, 64, 32))
    assert info.value.reason == "contains_eos" and info.value.field == "chosen"


@pytest.mark.parametrize("mode", ["reference", "joint"])
def test_empty_prompt_without_bos_is_an_error(tok, tok_nobos, mode):
    ex = PreferenceExample("", "yes", "no")
    with pytest.raises(RecordError) as info:
        tokenize_pair(ex, tok_nobos, TokenizeConfig(mode, 64, 32))
    assert info.value.reason == "empty_prompt" and info.value.field == "prompt"
    # with a BOS the first response token has a context: fine
    assert tokenize_pair(ex, tok, TokenizeConfig(mode, 64, 32)).prompt_ids == [tok.bos_token_id]


def test_joint_prompt_filling_max_length_is_no_room(tok):
    ex = PreferenceExample(HH_MULTI.prompt, " yes", " no")
    with pytest.raises(RecordError) as info:
        tokenize_pair(ex, tok, TokenizeConfig("joint", max_length=8))
    assert info.value.reason == "no_room_for_response" and info.value.field == "prompt"


def test_config_validation():
    with pytest.raises(ValueError, match="max_prompt_length"):
        TokenizeConfig("reference", max_length=16, max_prompt_length=16)
    with pytest.raises(ValueError, match="keep_end"):
        TokenizeConfig("joint", truncation_mode="keep_end")
    with pytest.raises(ValueError, match="mode"):
        TokenizeConfig("separate")


def test_tokenize_examples_skips_and_counts(tok_nobos, caplog):
    items = [
        (PreferenceExample("Q:", " a", " b"), Location("f.jsonl", 1)),
        (PreferenceExample("", " a", " b"), Location("f.jsonl", 2)),
        (PreferenceExample("Q:", " a<|eos|>", " b"), Location("f.jsonl", 3)),
        (SFTExample("Q:", " a"), Location("f.jsonl", 4)),
    ]
    cfg = TokenizeConfig("reference", 32, 16)
    with pytest.raises(RecordError, match="f.jsonl, line 2, field 'prompt'"):
        list(tokenize_examples(items, tok_nobos, cfg))
    counter = BadRecordCounter("skip")
    out = list(tokenize_examples(items, tok_nobos, cfg, counter))
    assert [loc.index for _, loc in out] == [1, 4]
    assert counter.summary() == {"contains_eos": 1, "empty_prompt": 1}
    with caplog.at_level(logging.INFO, logger="dpo_jax.data"):
        line = counter.log_summary()
    assert line == "data: 2 records kept, 2 skipped (contains_eos=1, empty_prompt=1)"
    assert "f.jsonl, line 3" in caplog.text
