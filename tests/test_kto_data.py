"""Unpaired (KTO) data: records -> examples through the run's one parsing path
(`train.inputs.load_splits`), preference pairs split as TRL's `unpair_preference_dataset`,
bad records named by file, line and field, and the batches' layout and labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import build_tokenizer

from dpo_jax.data import pipeline
from dpo_jax.data.batching import check_unpaired_batch, pad_unpaired
from dpo_jax.data.examples import RecordError, TokenizedUnpaired, UnpairedExample
from dpo_jax.data.formats import parse_unpaired_examples
from dpo_jax.train import defaults, inputs
from dpo_jax.train.validate import ConfigError, validate

GOOD = [
    {"prompt": "Question: 1? Answer:", "completion": " one.", "label": True},
    {"prompt": "Question: 2? Answer:", "completion": " no.", "label": False},
    {"prompt": "Question: 3? Answer:", "chosen": " three.", "rejected": " four."},
    {"prompt": "Question: 4? Answer:", "completion": " four.", "label": 1},
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(tokenizer_dir, **data):
    config = defaults.base_config()
    config.stages = ("dpo",)
    config.dpo.init_from = "model"
    config.dpo.loss.name = "kto"
    config.dpo.batch_size = 8
    config.model.preset = "tiny"
    config.data.tokenizer = str(tokenizer_dir)
    config.data.max_length = 32
    config.data.max_prompt_length = 16
    config.data.update(data)
    return config


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    build_tokenizer(directory)
    return directory


def test_unpaired_and_preference_records_become_labelled_examples(tmp_path, tok_dir):
    train = _write_jsonl(tmp_path / "train.jsonl", GOOD)
    held_out = _write_jsonl(tmp_path / "eval.jsonl", GOOD[:2])
    config = _config(tok_dir, train_files=(train,), eval_files=(held_out,))
    validate(config)
    splits = inputs.load_splits(config, str(tmp_path))
    assert splits.unpaired and len(splits.eval_pairs) == 2
    assert all(isinstance(x, TokenizedUnpaired) for x in splits.pairs)
    # The pair of line 3 gives a desirable and an undesirable example, in that order.
    assert [x.label for x in splits.pairs] == [True, False, True, False, True]
    tok = splits.tokenizer
    assert tok.decode(splits.pairs[2].completion_ids[:-1]) == " three."
    assert tok.decode(splits.pairs[3].completion_ids[:-1]) == " four."
    assert splits.pairs[2].prompt_ids == splits.pairs[3].prompt_ids
    # The same records under a paired loss: unpaired records are not preference pairs.
    config.dpo.loss.name = "sigmoid"
    with pytest.raises(RecordError, match=rf"{train}, line 1.*not_a_preference_record"):
        inputs.load_splits(config, str(tmp_path))


def test_unpair_preference_matches_trl():
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    records = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "The sun is", "chosen": " in the sky.", "rejected": " in the sea."},
    ]
    theirs = unpair_preference_dataset(Dataset.from_list(records))
    ours = [e for r in records for e in parse_unpaired_examples(r)]
    # TRL puts all chosen rows first; per record the same (prompt, completion, label) set.
    assert sorted((e.prompt, e.completion, e.label) for e in ours) == sorted(
        (r["prompt"], r["completion"], r["label"]) for r in theirs
    )
    assert ours[:2] == [UnpairedExample("The sky is", " blue.", True),
                        UnpairedExample("The sky is", " green.", False)]  # fmt: skip


@pytest.mark.parametrize(
    "bad,reason,field,message",
    [
        ({"prompt": "Q", "completion": " A"}, "missing_field", "label", "missing field"),
        ({"prompt": "Q", "completion": " A", "label": None}, "missing_field", "label", "null"),
        ({"prompt": "Q", "completion": " A", "label": "yes"}, "bad_label", "label", "true/false"),
        ({"prompt": "Q", "completion": " A", "label": 2}, "bad_label", "label", "true/false"),
        ({"prompt": "Q", "completion": "", "label": True}, "empty_field", "completion", "empty"),
        ({"prompt": "Q", "completion": "  ", "label": False}, "empty_field", "completion", "only"),
        ({"prompt": "Q", "label": True}, "missing_field", "completion", "missing field"),
    ],
)
def test_bad_unpaired_records_name_file_line_and_field(tmp_path, tok_dir, bad, reason, field,
                                                       message):  # fmt: skip
    train = _write_jsonl(tmp_path / "train.jsonl", [GOOD[0], GOOD[1], bad, GOOD[3]])
    config = _config(tok_dir, train_files=(train,), eval_files=(train,))
    with pytest.raises(RecordError) as err:
        inputs.load_splits(config, str(tmp_path))
    assert str(err.value).startswith(f"{train}, line 3, field {field!r}: ")
    assert message in str(err.value) and err.value.reason == reason
    # Or skipped and counted, when the user chose skipping.
    config.data.on_bad_record = "skip"
    splits = inputs.load_splits(config, str(tmp_path))
    assert len(splits.pairs) == 3 and splits.bad_records == {reason: 2}  # train and held out


def test_unpaired_batches_carry_kl_sequences_and_labels():
    items = [TokenizedUnpaired([1, 5], [6, 7, 2], True), TokenizedUnpaired([1], [8, 2], False),
             TokenizedUnpaired([1, 9, 9], [3, 2], True)]  # fmt: skip
    batch = pad_unpaired(items, max_length=8, batch_size=4)
    check_unpaired_batch(batch)
    assert batch["tokens"].shape == (4, 2, 8)
    assert batch["labels"].tolist() == [1, 0, 1, 0] and batch["pair_mask"].tolist() == [1, 1, 1, 0]
    # Side 0: the example; side 1: its prompt with the previous example's completion.
    assert batch["tokens"][0, 0, :5].tolist() == [1, 5, 6, 7, 2]
    assert batch["tokens"][0, 1, :4].tolist() == [1, 5, 3, 2]
    assert batch["tokens"][1, 1, :4].tolist() == [1, 6, 7, 2]
    assert batch["loss_mask"][1, 1].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    spec = pipeline.IteratorSpec(batch_size=2, max_length=8, num_epochs=1, shuffle=False)
    batches = list(pipeline.make_unpaired_iterator(items, spec))
    assert [b["labels"].tolist() for b in batches] == [[1, 0], [1, 0]]
    # The last batch holds one real example: its KL sequence is its own (nothing to mismatch).
    np.testing.assert_array_equal(batches[1]["tokens"][0, 0], batches[1]["tokens"][0, 1])
    with pytest.raises(ValueError, match="padded"):
        pipeline.make_unpaired_iterator(items, pipeline.IteratorSpec(2, 8, layout="packed"))


def test_validate_names_what_kto_cannot_do(tok_dir):
    config = _config(tok_dir, synthetic=True, layout="packed")
    config.dpo.reference = "cached"
    config.dpo.batch_size = 1
    config.parallel.mesh_shape = (1, 1, 1)
    with pytest.raises(ConfigError) as err:
        validate(config)
    problems = "\n".join(err.value.problems)
    assert "config.dpo.reference='cached': loss 'kto' needs the frozen reference" in problems
    assert "config.data.layout='packed': loss 'kto' needs 'padded'" in problems
    assert "config.dpo.batch_size=1: loss 'kto' estimates its KL" in problems
    config.dpo.loss.name = "apo_zero_unpaired"  # no KL baseline: a batch of 1 is fine
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert not any("batch_size" in p for p in err.value.problems)


def test_a_tfds_preference_dataset_feeds_kto_as_unpaired_examples(tmp_path):
    """Fake official HH files -> our hh_rlhf builder (array_record) -> KTO examples: the
    same TFDS/grain path as DPO, each pair split into a desirable and an undesirable one."""
    from test_data_tfds import _hh_record, _write_jsonl_gz

    from dpo_jax.data import synthetic

    manual = tmp_path / "hh"
    for split, n in (("train", 6), ("test", 3)):
        records = [_hh_record("helpful-base", split, i) for i in range(n)]
        _write_jsonl_gz(manual / "helpful-base" / f"{split}.jsonl.gz", records)
    tokenizer_dir = tmp_path / "tokenizer"
    synthetic.build_char_tokenizer(str(tokenizer_dir))
    config = _config(
        tokenizer_dir,
        tfds_name="hh_rlhf/helpful_base",
        tfds_data_dir=str(tmp_path / "tfds"),
        tfds_manual_dir=str(manual),
        format="standard",
        truncation_mode="keep_end",
        max_length=96,
        max_prompt_length=64,
    )
    validate(config)
    splits = inputs.load_splits(config, str(tmp_path))
    assert splits.unpaired and len(splits.pairs) == 12 and len(splits.eval_pairs) == 6
    assert [x.label for x in splits.eval_pairs] == [True, False] * 3
    batch = next(inputs.train_iterator(splits, config, "dpo", batch_size=8, seed=0))
    check_unpaired_batch(batch)
    assert batch["pair_mask"].tolist() == [1] * 8
