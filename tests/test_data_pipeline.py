"""Grain pipeline: seeded order, epochs, shards, exact checkpoint/restore, bad records, tfds."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import build_tokenizer

from dpo_jax.data import batching, pipeline, tfds_builders
from dpo_jax.data.examples import RecordError, TokenizedPair, TokenizedSequence
from dpo_jax.data.formats import parse_preference
from dpo_jax.data.tokenize import TokenizeConfig, tokenize_pair

BOS, EOS, ID_OFFSET = 1, 2, 10


def _records(n):
    return [
        {"prompt": str(i), "chosen": "c" * (1 + i % 4), "rejected": "r" * (1 + i % 3)}
        for i in range(n)
    ]


def _tokenize(example):
    """Toy tokenizer: the record id is token 1 of the prompt; one token per response char."""
    return TokenizedPair(
        [BOS, ID_OFFSET + int(example.prompt)],
        [5] * len(example.chosen) + [EOS],
        [6] * len(example.rejected) + [EOS],
    )


def _iterator(source, **kw):
    kw = {
        "tokenize_fn": _tokenize,
        "batch_size": 3,
        "max_length": 8,
        "shard_index": 0,
        "shard_count": 1,
    } | kw
    return pipeline.make_preference_iterator(source, **kw)


def _ids(batch):
    """Record ids of the real pairs of a batch, in pair-slot order."""
    if batching.is_packed(batch):
        ids = {}
        chosen_second = (
            (batch["positions"] == 1) & (batch["slot_ids"] >= 0) & (batch["slot_ids"] % 2 == 0)
        )
        for slot, tok in zip(
            batch["slot_ids"][chosen_second], batch["tokens"][chosen_second], strict=True
        ):
            ids[int(slot) // 2] = int(tok) - ID_OFFSET
        assert sorted(ids) == list(range(int(batch["pair_mask"].sum())))
        return [ids[b] for b in sorted(ids)]
    return [
        int(t) - ID_OFFSET
        for t, m in zip(batch["tokens"][:, 0, 1], batch["pair_mask"], strict=True)
        if m
    ]


def _all_ids(it):
    return [i for batch in it for i in _ids(batch)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_seed_determines_order_and_epochs_reshuffle():
    source = _records(10)
    first = _all_ids(_iterator(source, seed=7, num_epochs=2))
    assert first == _all_ids(_iterator(source, seed=7, num_epochs=2))
    assert first != _all_ids(_iterator(source, seed=8, num_epochs=2))
    epoch0, epoch1 = first[:10], first[10:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and epoch0 != list(range(10))
    assert _all_ids(_iterator(source, shuffle=False, num_epochs=2)) == list(range(10)) * 2


def test_last_partial_batch_padded_or_dropped():
    source = _records(10)
    batches = list(_iterator(source, shuffle=False))
    assert [b["pair_mask"].tolist() for b in batches][-1] == [1, 0, 0]
    assert all(b["tokens"].shape == (3, 2, 8) for b in batches)
    assert not batches[-1]["loss_mask"][1:].any() and not batches[-1]["segment_ids"][1:].any()
    dropped = list(_iterator(source, shuffle=False, drop_remainder=True))
    assert len(dropped) == 3 and _all_ids(dropped) == list(range(9))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_checkpoint_restore_continues_with_the_same_batches(layout):
    # 10 records, B=3: the 20-record stream crosses the epoch boundary inside batch 3.
    kw = dict(seed=3, num_epochs=2, layout=layout)
    if layout == "packed":
        kw.update(num_rows=2, max_length=12, pack_buffer_size=5)
    uninterrupted = list(_iterator(_records(10), **kw))
    for stop in (1, 3, 5):
        it = _iterator(_records(10), **kw)
        head = [next(it) for _ in range(stop)]
        state = json.loads(json.dumps(it.get_state()))  # must survive JSON
        if layout == "packed" and stop == 3:
            assert state["pending"], "the test should restore pairs held back by packing"
        rest = list(it)
        restored = _iterator(_records(10), **kw)
        restored.set_state(state)
        _assert_same_batches(head + rest, uninterrupted)
        _assert_same_batches(list(restored), rest)
    # Packing really packs several pairs per row here.
    if layout == "packed":
        assert max(int(b["segment_ids"].max()) for b in uninterrupted) >= 2
        assert sorted(_all_ids(uninterrupted)) == sorted(list(range(10)) * 2)


def test_restore_into_a_used_iterator_and_endless_stream():
    it = _iterator(_records(7), num_epochs=None, batch_size=4)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]  # 7 records, endless: well past epoch 2
    assert it.epoch > 2
    for _ in range(2):
        next(it)
    it.set_state(state)
    _assert_same_batches([next(it) for _ in range(4)], want)


def test_state_of_a_different_pipeline_is_refused():
    state = _iterator(_records(10), seed=1).get_state()
    with pytest.raises(ValueError, match=r"different pipeline.*'seed': \(1, 2\)"):
        _iterator(_records(10), seed=2).set_state(state)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_process_shards_are_disjoint_cover_the_data_and_run_in_lockstep(drop_remainder):
    source = _records(11)
    shards = [
        list(
            _iterator(
                source,
                seed=5,
                shard_index=p,
                shard_count=2,
                batch_size=2,
                drop_remainder=drop_remainder,
            )
        )
        for p in range(2)
    ]
    assert len(shards[0]) == len(shards[1])  # lockstep: 3 batches each
    ids = [_all_ids(s) for s in shards]
    assert not set(ids[0]) & set(ids[1])
    if drop_remainder:
        assert len(ids[0]) == len(ids[1]) == 4 and len(shards[0]) == 2
    else:
        assert sorted(ids[0] + ids[1]) == list(range(11))
        assert shards[1][-1]["pair_mask"].tolist() == [1, 0]  # 5 records + one empty slot
    # A step's global batch is the same records as one process with a twice larger batch.
    single = list(_iterator(source, seed=5, batch_size=4, drop_remainder=drop_remainder))
    for step, batch in enumerate(single):
        assert sorted(_ids(batch)) == sorted(_ids(shards[0][step]) + _ids(shards[1][step]))


def test_bad_records_raise_naming_the_record_or_are_skipped_and_counted():
    source = _records(9)
    source[2] = {"prompt": "2", "chosen": "c"}  # missing field
    source[5] = {"prompt": "5", "chosen": "c" * 9, "rejected": "r"}  # 12 tokens > max_length 8
    source[6] = {"prompt": "6", "chosen": "BAD", "rejected": "r"}

    def tokenize(example):
        if example.chosen == "BAD":
            raise RecordError("untokenizable", "cannot tokenize", field="chosen")
        return _tokenize(example)

    kw = dict(
        tokenize_fn=tokenize, shuffle=False, source_name="prefs.jsonl", record_format="standard"
    )
    with pytest.raises(RecordError, match=r"prefs\.jsonl, record 2, field 'rejected'"):
        list(_iterator(source, **kw))
    with pytest.raises(RecordError, match=r"record 2, field 'chosen_ids': 2 prompt \+ 10 response"):
        list(_iterator(source[3:], **kw))
    it = _iterator(source, on_bad_record="skip", **kw)
    first = next(it)
    assert _ids(first) == [0, 1, 3]  # the batch is refilled past the bad record
    state = it.get_state()
    rest = list(it)
    assert _all_ids(rest) == [4, 7, 8]
    assert it.bad_records.summary() == {"missing_field": 1, "too_long": 1, "untokenizable": 1}
    restored = _iterator(source, on_bad_record="skip", **kw)
    restored.set_state(state)
    _assert_same_batches(list(restored), rest)
    assert restored.bad_records.summary() == it.bad_records.summary()
    assert restored.bad_records.num_ok == 6


def test_sft_iterator_batches_and_restores():
    def tokenize(example):
        return TokenizedSequence(
            [BOS, ID_OFFSET + int(example.prompt)], [7] * len(example.completion) + [EOS]
        )

    records = [{"prompt": str(i), "completion": "x" * (1 + i % 3)} for i in range(9)]
    kw = dict(
        tokenize_fn=tokenize,
        batch_size=4,
        max_length=6,
        seed=0,
        num_epochs=2,
        shard_index=0,
        shard_count=1,
    )
    batches = list(pipeline.make_sft_iterator(records, **kw))
    assert [b["example_mask"].sum() for b in batches] == [4, 4, 4, 4, 2]
    assert batches[0]["tokens"].shape == (4, 6)
    ids = [
        int(t) - ID_OFFSET
        for b in batches
        for t, m in zip(b["tokens"][:, 1], b["example_mask"], strict=True)
        if m
    ]
    assert sorted(ids) == sorted(list(range(9)) * 2)
    it = pipeline.make_sft_iterator(records, **kw)
    next(it)
    restored = pipeline.make_sft_iterator(records, **kw)
    restored.set_state(json.loads(json.dumps(it.get_state())))
    _assert_same_batches(list(restored), batches[1:])


def test_tfds_data_source_with_a_real_tokenizer(tmp_path):
    manual = tmp_path / "files"
    manual.mkdir()
    records = [
        {"prompt": f"Question: what is {i}? Answer:", "chosen": f" it is {i}.", "rejected": " no."}
        for i in range(7)
    ]
    (manual / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tfds_builders.prepare("preference_files", manual_dir=manual, data_dir=tmp_path / "data")
    source = tfds.data_source(
        "preference_files", split="train", data_dir=os.fspath(tmp_path / "data")
    )
    tokenizer = build_tokenizer(tmp_path / "tok")
    config = TokenizeConfig(max_length=32, max_prompt_length=16)
    kw = dict(tokenize_config=config, batch_size=4, shuffle=False, shard_index=0, shard_count=1)
    batches = list(pipeline.make_preference_iterator(source, tokenizer, **kw))
    pairs = [tokenize_pair(parse_preference(r), tokenizer, config) for r in records]
    pad = dict(max_length=32, pad_id=tokenizer.pad_token_id, batch_size=4)
    _assert_same_batches(
        batches, [batching.pad_pairs(pairs[:4], **pad), batching.pad_pairs(pairs[4:], **pad)]
    )
    # Sharded and shuffled over the same tfds source: disjoint, covering.
    shard_ids = []
    for p in range(2):
        it = pipeline.make_preference_iterator(
            source, tokenizer, **(kw | dict(shuffle=True, shard_index=p, shard_count=2))
        )
        for b in it:
            for row, m in zip(b["tokens"][:, 0], b["pair_mask"], strict=True):
                if m:
                    shard_ids.append(tokenizer.decode(row[row != tokenizer.pad_token_id]))
    assert len(shard_ids) == len(set(shard_ids)) == 7


def test_shard_defaults_to_the_jax_process_and_arguments_are_checked():
    import jax

    it = pipeline.make_preference_iterator(
        _records(4), tokenize_fn=_tokenize, batch_size=2, max_length=8
    )
    assert (it.spec["shard_index"], it.spec["shard_count"]) == (
        jax.process_index(),
        jax.process_count(),
    )
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        _iterator(_records(4), shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="source is empty"):
        _iterator([])
    with pytest.raises(ValueError, match="tokenize_fn, or tokenizer and tokenize_config"):
        pipeline.make_preference_iterator(_records(4), batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="layout"):
        _iterator(_records(4), layout="ragged")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_batches_carry_the_cached_ref_logps_of_their_records(layout):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(10, 2)).astype(np.float32)
    kw = dict(seed=3, num_epochs=2, layout=layout, ref_logps=ref, shard_index=1, shard_count=2)
    if layout == "packed":
        kw.update(num_rows=2, max_length=12, pack_buffer_size=5)

    def check(batches):
        for batch in batches:
            ids = _ids(batch)
            n = len(ids)
            np.testing.assert_array_equal(batch["ref_logps"][:n], ref[ids])
            np.testing.assert_array_equal(batch["ref_logps"][n:], 0.0)  # padding pairs
        return batches

    uninterrupted = check(list(_iterator(_records(10), **kw)))
    assert sum(int(b["pair_mask"].sum()) for b in uninterrupted) == 10  # half of 2 epochs
    without = list(_iterator(_records(10), **{**kw, "ref_logps": None}))
    for a, b in zip(uninterrupted, without, strict=True):
        assert "ref_logps" not in b
        _assert_same_batches([{k: v for k, v in a.items() if k != "ref_logps"}], [b])
    it = _iterator(_records(10), **kw)
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = _iterator(_records(10), **kw)
    restored.set_state(state)
    _assert_same_batches(check(list(restored)), uninterrupted[2:])


def test_bad_ref_logps_are_refused_naming_the_record():
    ref = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match=r"expected \(10, 2\)"):
        _iterator(_records(10), ref_logps=ref[:9])
    ref[4, 1] = np.nan
    with pytest.raises(ValueError, match="source, record 4 is not finite"):
        _iterator(_records(10), ref_logps=ref)
