"""Tests for the quickstart's synthetic preference task and its character tokenizer."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_jax.data import synthetic


def _one_edit_apart(a: str, b: str) -> bool:
    """True iff b is a single substitution, adjacent swap, deletion or insertion of a."""
    if a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        i, j = (diff + [None, None])[:2]
        return len(diff) == 2 and j == i + 1 and a[i] == b[j] and a[j] == b[i]
    short, long = (a, b) if len(a) < len(b) else (b, a)
    if len(long) - len(short) != 1:
        return False
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def test_same_seed_same_records_and_different_seed_different_records():
    a = synthetic.make_preference_records(50, seed=3)
    assert a == synthetic.make_preference_records(50, seed=3)
    assert a != synthetic.make_preference_records(50, seed=4)
    # A prefix of a longer run is the shorter run: n does not change earlier records.
    assert synthetic.make_preference_records(80, seed=3)[:50] == a


@pytest.mark.parametrize("rule", synthetic.RULES)
def test_records_follow_the_rule_and_rejected_has_one_mistake(rule):
    records = synthetic.make_preference_records(300, seed=0, rule=rule, min_length=2, max_length=6)
    assert len(records) == 300
    for record in records:
        assert set(record) == {"prompt", "chosen", "rejected"}
        assert record["prompt"].endswith("=")
        text = record["prompt"][:-1]
        assert 2 <= len(text) <= 6
        assert set(text) <= set(synthetic.DEFAULT_ALPHABET)
        expected = text[::-1] if rule == "reverse" else "".join(sorted(text))
        assert record["chosen"] == expected
        assert record["rejected"], record
        assert _one_edit_apart(record["chosen"], record["rejected"]), record
    # Every mistake kind shows up, so DPO sees varied negatives.
    kinds = set()
    for r in records:
        c, j = r["chosen"], r["rejected"]
        kinds.add("len-" if len(j) < len(c) else "len+" if len(j) > len(c) else "same")
    assert kinds == {"len-", "len+", "same"}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab1", min_size=1, max_size=10), st.integers(0, 2**31))
def test_corrupt_always_changes_the_answer_by_one_edit(answer, seed):
    rejected = synthetic.corrupt(answer, random.Random(seed), alphabet="ab1")
    assert rejected
    assert _one_edit_apart(answer, rejected)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rule"):
        synthetic.make_preference_records(3, 0, rule="shuffle")
    with pytest.raises(ValueError, match="min_length"):
        synthetic.make_preference_records(3, 0, min_length=5, max_length=2)
    with pytest.raises(ValueError, match="alphabet"):
        synthetic.make_preference_records(3, 0, alphabet="aa")
    with pytest.raises(ValueError, match="empty"):
        synthetic.corrupt("", random.Random(0))


def test_write_jsonl_round_trips(tmp_path):
    records = synthetic.make_preference_records(7, seed=1)
    path = synthetic.write_jsonl(records, tmp_path / "sub" / "train.jsonl")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_char_tokenizer_loads_offline_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    synthetic.build_char_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) < 128
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4

    for record in synthetic.make_preference_records(20, seed=2):
        for field in ("prompt", "chosen", "rejected"):
            text = record[field]
            encoded = tok(text)["input_ids"]
            # One token per character, BOS in front, no EOS appended.
            assert encoded[0] == tok.bos_token_id
            assert len(encoded) == len(text) + 1
            assert tok.eos_token_id not in encoded
            assert tok.decode(encoded, skip_special_tokens=True) == text
            assert tok(text, add_special_tokens=False)["input_ids"] == encoded[1:]

    assert tok("a\u00e9b", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id
    assert tok.decode(tok(" a b\n", add_special_tokens=False)["input_ids"]) == " a b\n"


def test_char_tokenizer_chat_template(tmp_path):
    from transformers import AutoTokenizer

    synthetic.build_char_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    messages = [{"role": "user", "content": "abc="}, {"role": "assistant", "content": "cba"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<bos>user: abc=\nassistant: cba<eos>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>user: abc=\nassistant: "
    ids = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    # The template's BOS is the only one: tokenizing the template output adds no second BOS.
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == prompt
