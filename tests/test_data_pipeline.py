"""The run's data: records parsed and tokenized up front (`train.inputs.load_splits`, bad
records named or skipped and counted), then the grain pipeline over tokenized items: seeded
order, epochs, shards, exact checkpoint/restore, cached ref_logps, tfds."""

import dataclasses
import json
import logging

import numpy as np
import pytest
from data_helpers import build_tokenizer

from dpo_jax.data import batching, pipeline, tfds_builders
from dpo_jax.data.examples import RecordError, TokenizedPair, TokenizedSequence
from dpo_jax.data.formats import parse_preference
from dpo_jax.data.pipeline import IteratorSpec
from dpo_jax.data.tokenize import tokenize_pair
from dpo_jax.train import defaults, inputs

BOS, EOS, ID_OFFSET = 1, 2, 10


def _records(n):
    """Tokenized pairs; the pair id is token 1 of the prompt, one token per response char."""
    return [
        TokenizedPair([BOS, ID_OFFSET + i], [5] * (1 + i % 4) + [EOS], [6] * (1 + i % 3) + [EOS])
        for i in range(n)
    ]


def _iterator(source, ref_logps=None, **kw):
    spec = IteratorSpec(
        **({"batch_size": 3, "max_length": 8, "shard_index": 0, "shard_count": 1} | kw)
    )
    return pipeline.make_preference_iterator(source, spec, ref_logps=ref_logps)


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
    assert it.get_state()["next_index"] > 2 * 7  # consumed positions: past epoch 2
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


def test_items_that_do_not_fit_or_are_not_tokenized_are_refused_naming_the_item():
    source = _records(4)
    source[2] = TokenizedPair([BOS, 12], [5] * 9 + [EOS], [6, EOS])  # 12 tokens > 8
    with pytest.raises(ValueError, match=r"prefs, item 2: 2 prompt \+ 10 chosen_ids tokens"):
        _iterator(source, source_name="prefs")
    with pytest.raises(TypeError, match=r"item 0: expected TokenizedPair .* got dict"):
        _iterator([{"prompt": "0", "chosen": "c", "rejected": "r"}])


def test_state_saved_with_bad_record_counts_still_restores():
    # Iterator states written before records were parsed up front carry "bad_records".
    it = _iterator(_records(10), seed=4)
    next(it)
    state = it.get_state() | {"bad_records": {"num_ok": 3, "counts": {}, "first_errors": {}}}
    rest = list(it)
    restored = _iterator(_records(10), seed=4)
    restored.set_state(state)
    _assert_same_batches(list(restored), rest)


def test_sft_iterator_batches_and_restores():
    records = [TokenizedSequence([BOS, ID_OFFSET + i], [7] * (1 + i % 3) + [EOS]) for i in range(9)]
    spec = IteratorSpec(
        batch_size=4, max_length=6, seed=0, num_epochs=2, shard_index=0, shard_count=1
    )
    batches = list(pipeline.make_sft_iterator(records, spec))
    assert [b["example_mask"].sum() for b in batches] == [4, 4, 4, 4, 2]
    assert batches[0]["tokens"].shape == (4, 6)
    ids = [
        int(t) - ID_OFFSET
        for b in batches
        for t, m in zip(b["tokens"][:, 1], b["example_mask"], strict=True)
        if m
    ]
    assert sorted(ids) == sorted(list(range(9)) * 2)
    it = pipeline.make_sft_iterator(records, spec)
    next(it)
    restored = pipeline.make_sft_iterator(records, spec)
    restored.set_state(json.loads(json.dumps(it.get_state())))
    _assert_same_batches(list(restored), batches[1:])


def test_shard_defaults_to_the_jax_process_and_arguments_are_checked():
    import jax

    spec = IteratorSpec(batch_size=2, max_length=8)
    it = pipeline.make_preference_iterator(_records(4), spec)
    assert (it.spec["shard_index"], it.spec["shard_count"]) == (
        jax.process_index(),
        jax.process_count(),
    )
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        _iterator(_records(4), shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="source is empty"):
        _iterator([])
    with pytest.raises(ValueError, match="layout"):
        _iterator(_records(4), layout="ragged")
    with pytest.raises(ValueError, match="SFT batches are padded"):
        pipeline.make_sft_iterator([], IteratorSpec(batch_size=2, max_length=8, layout="packed"))
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        _iterator(_records(4), pad_to_multiple_of=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


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


# ----------------------------------------------------------------------------------------
# Records -> tokenized splits (`train.inputs.load_splits`): the one parsing path of a run
# ----------------------------------------------------------------------------------------

QA = [
    {"prompt": f"Question: what is {i}? Answer:", "chosen": f" it is {i}.", "rejected": " no."}
    for i in range(7)
]


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _data_config(tokenizer_dir, **data):
    config = defaults.base_config()
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


def test_bad_records_stop_the_run_naming_file_line_field_or_are_skipped_and_counted(
    tmp_path, tok_dir
):
    records = list(QA)
    records[1] = "{broken"  # line 2
    records[2] = {"prompt": "Q", "chosen": " same", "rejected": " same"}  # line 3
    records[4] = {"prompt": "Q", "completion": " an SFT record"}  # line 5
    train = _write_jsonl(tmp_path / "train.jsonl", records)
    held_out = _write_jsonl(tmp_path / "eval.jsonl", [QA[0], {"prompt": "Q", "chosen": " c"}])
    config = _data_config(tok_dir, train_files=(train,), eval_files=(held_out,))
    with pytest.raises(RecordError, match=rf"{train}, line 2: invalid JSON"):
        inputs.load_splits(config, str(tmp_path))
    config.data.on_bad_record = "skip"
    splits = inputs.load_splits(config, str(tmp_path))
    assert len(splits.pairs) == 4 and len(splits.eval_pairs) == 1
    assert splits.bad_records == {
        "identical_responses": 1,
        "invalid_json": 1,
        "not_a_preference_record": 1,
        "unknown_format": 1,  # the held-out file's line 2
    }
    # The kept pairs are exactly those of the good records, in file order.
    tokenizer = splits.tokenizer
    want = [
        tokenize_pair(parse_preference(QA[i]), tokenizer, splits.tokenize_config)
        for i in (0, 3, 5, 6)
    ]
    assert splits.pairs == want


def test_prompt_completion_record_in_a_preference_file_names_file_line_field(tmp_path, tok_dir):
    train = _write_jsonl(tmp_path / "train.jsonl", [QA[0], {"prompt": "Q", "completion": " A"}])
    config = _data_config(tok_dir, train_files=(train,))
    with pytest.raises(RecordError) as info:
        inputs.load_splits(config, str(tmp_path))
    err = info.value
    assert (err.reason, err.file, err.index, err.field) == (
        "not_a_preference_record",
        train,
        2,
        "chosen",
    )


def test_truncated_prompts_are_counted_and_warned_once(tmp_path, tok_dir, caplog):
    long = [dict(r, prompt=r["prompt"] * 6) for r in QA]  # prompts far over 16 tokens
    train = _write_jsonl(tmp_path / "train.jsonl", long[:5] + QA[5:])
    held_out = _write_jsonl(tmp_path / "eval.jsonl", QA[:2])
    config = _data_config(tok_dir, train_files=(train,), eval_files=(held_out,))
    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        splits = inputs.load_splits(config, str(tmp_path))
    assert splits.tokenize_events == {"prompt_truncated": 5}
    assert all(len(p.prompt_ids) <= 16 for p in splits.pairs[:5])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "truncated 5 prompts" in warnings[0].getMessage()
    assert "max_prompt_length=16" in warnings[0].getMessage()


def test_tfds_split_gives_the_same_pairs_and_batches_as_its_files(tmp_path, tok_dir):
    manual = tmp_path / "files"
    manual.mkdir()
    _write_jsonl(manual / "train.jsonl", QA)
    _write_jsonl(manual / "test.jsonl", QA[:3])
    data_dir = tmp_path / "data"
    tfds_builders.prepare("preference_files", manual_dir=manual, data_dir=data_dir)
    config = _data_config(tok_dir, tfds_name="preference_files", tfds_data_dir=str(data_dir))
    splits = inputs.load_splits(config, str(tmp_path))
    files = _data_config(
        tok_dir,
        train_files=(str(manual / "train.jsonl"),),
        eval_files=(str(manual / "test.jsonl"),),
    )
    from_files = inputs.load_splits(files, str(tmp_path))
    assert splits.pairs == from_files.pairs and len(splits.pairs) == 7
    assert splits.eval_pairs == from_files.eval_pairs and len(splits.eval_pairs) == 3
    # The held-out iterator: file order, padded with the tokenizer's pad id.
    batches = list(inputs.eval_iterator(splits, config, batch_size=4))
    pad = dict(max_length=32, pad_id=splits.tokenizer.pad_token_id, batch_size=4)
    _assert_same_batches(batches, [batching.pad_pairs(splits.eval_pairs, **pad)])
    # Sharded and shuffled training stream over the same pairs: disjoint, covering.
    shard_ids = []
    for p in range(2):
        spec = inputs.iterator_spec(
            splits, config, batch_size=2, seed=3, num_epochs=1, shard_index=p, shard_count=2
        )
        for b in pipeline.make_preference_iterator(splits.pairs, spec):
            for row, m in zip(b["tokens"][:, 0], b["pair_mask"], strict=True):
                if m:
                    shard_ids.append(tuple(row.tolist()))
    assert len(shard_ids) == len(set(shard_ids)) == 7
