"""Tests for padded / packed preference batches and padded SFT batches."""

import collections

import numpy as np
import pytest
from data_helpers import pack_pairs, pair_sums, pair_token_counts
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_jax.data import batching
from dpo_jax.data.examples import TokenizedPair, TokenizedSequence

PAD = 0
PAD_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")

ids = st.lists(st.integers(1, 50), min_size=1, max_size=6)
pair_st = st.builds(TokenizedPair, prompt_ids=ids, chosen_ids=ids, rejected_ids=ids)
pairs_st = st.lists(pair_st, min_size=1, max_size=8)
fast = settings(max_examples=60, deadline=None)


def _sides(pair):
    return [(pair.prompt_ids, pair.chosen_ids), (pair.prompt_ids, pair.rejected_ids)]


def _value_table(seed):
    # A random value per (token id, position): both layouts look values up from their own
    # tokens/positions, so per-pair sums agree only if the layouts hold the same tokens.
    return np.random.default_rng(seed).normal(size=(64, 32))


def _check_padded_row(tokens, positions, segment_ids, loss_mask, prompt, response):
    n_p, n = len(prompt), len(prompt) + len(response)
    assert tokens[:n].tolist() == list(prompt) + list(response)
    assert positions[:n].tolist() == list(range(n))
    assert (segment_ids[:n] == 1).all()
    # loss_mask covers exactly the response tokens (EOS included), never prompt or padding.
    assert loss_mask.tolist() == [0] * n_p + [1] * len(response) + [0] * (len(tokens) - n)
    assert (tokens[n:] == PAD).all() and (positions[n:] == 0).all() and (segment_ids[n:] == 0).all()


def _unpack_sequences(batch):
    """slot -> (prompt, response) read back from a packed batch, checking row invariants."""
    out = {}
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        real = seg > 0
        n_real = int(real.sum())
        # Real tokens come first, then only padding; segment ids are 1..S consecutive.
        assert real[:n_real].all() and not real[n_real:].any()
        assert (batch["slot_ids"][r][~real] == -1).all()
        assert (batch["tokens"][r][~real] == PAD).all()
        assert (batch["loss_mask"][r][~real] == 0).all()
        assert (batch["positions"][r][~real] == 0).all()
        if n_real:
            assert seg[0] == 1 and set(np.diff(seg[:n_real]).tolist()) <= {0, 1}
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            assert batch["positions"][r][where].tolist() == list(range(len(where)))
            slots = set(batch["slot_ids"][r][where].tolist())
            assert len(slots) == 1 and min(slots) >= 0
            slot = slots.pop()
            mask = batch["loss_mask"][r][where]
            n_p = int((mask == 0).sum())
            # Prompt (unscored) first, then the scored response.
            assert n_p >= 1 and mask.tolist() == [0] * n_p + [1] * (len(where) - n_p)
            toks = batch["tokens"][r][where].tolist()
            assert slot not in out, "a slot appears in two segments"
            out[slot] = (toks[:n_p], toks[n_p:])
    return out


# --- padded --------------------------------------------------------------------------


@fast
@given(pairs_st, st.integers(0, 4), st.sampled_from([None, 4, 5]))
def test_pad_pairs_layout(pairs, extra, multiple):
    batch = batching.pad_pairs(
        pairs, max_length=16, pad_id=PAD, pad_to_multiple_of=multiple, batch_size=len(pairs) + extra
    )
    B, L = len(pairs) + extra, batch["tokens"].shape[-1]
    for key in PAD_KEYS:
        assert batch[key].shape == (B, 2, L) and batch[key].dtype == np.int32
    assert batch["pair_mask"].tolist() == [1] * len(pairs) + [0] * extra
    assert L in batching.allowed_lengths(16, pad_to_multiple_of=multiple)
    longest = max(len(p) + len(r) for pair in pairs for p, r in _sides(pair))
    # The smallest allowed length that holds the longest sequence.
    assert L == min(
        x for x in batching.allowed_lengths(16, pad_to_multiple_of=multiple) if x >= longest
    )
    for b, pair in enumerate(pairs):
        for side, (prompt, response) in enumerate(_sides(pair)):
            row = [batch[k][b, side] for k in PAD_KEYS]
            _check_padded_row(*row, prompt, response)
    for key in PAD_KEYS:  # padding pairs are zero everywhere
        assert (batch[key][len(pairs) :] == 0).all()


@fast
@given(pairs_st, st.lists(st.integers(2, 20), min_size=1, max_size=4))
def test_pad_pairs_buckets(pairs, buckets):
    batch = batching.pad_pairs(pairs, max_length=20, buckets=buckets)
    L = batch["tokens"].shape[-1]
    assert L in sorted(set(buckets) | {20})
    longest = max(len(p) + len(r) for pair in pairs for p, r in _sides(pair))
    assert L >= longest
    assert not [b for b in buckets if longest <= b < L]


def test_allowed_lengths():
    assert batching.allowed_lengths(16) == [16]
    assert batching.allowed_lengths(16, pad_to_multiple_of=4) == [4, 8, 12, 16]
    assert batching.allowed_lengths(18, pad_to_multiple_of=8) == [8, 16, 18]
    assert batching.allowed_lengths(16, buckets=[8, 4, 8]) == [4, 8, 16]
    with pytest.raises(ValueError, match="not both"):
        batching.allowed_lengths(16, pad_to_multiple_of=4, buckets=[8])
    with pytest.raises(ValueError, match="bucket"):
        batching.allowed_lengths(16, buckets=[32])


def test_pad_single_pair_exact_arrays():
    pair = TokenizedPair(prompt_ids=[5, 6], chosen_ids=[7, 2], rejected_ids=[8, 9, 2])
    batch = batching.pad_pairs([pair], max_length=8, pad_id=0, pad_to_multiple_of=4, batch_size=2)
    np.testing.assert_array_equal(
        batch["tokens"],
        [[[5, 6, 7, 2, 0, 0, 0, 0], [5, 6, 8, 9, 2, 0, 0, 0]], [[0] * 8, [0] * 8]],
    )
    np.testing.assert_array_equal(
        batch["loss_mask"][0], [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["positions"][0], [[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    )
    np.testing.assert_array_equal(batch["pair_mask"], [1, 0])
    np.testing.assert_array_equal(pair_token_counts(batch), [[2, 3], [0, 0]])
    # 2 pairs x 2 sides x 8 slots = 32 token slots, 4 + 5 of them real.
    assert batching.padding_fraction(batch) == pytest.approx(1 - 9 / 32)


def test_pad_pairs_errors_name_the_pair():
    ok = TokenizedPair([1], [2, 3], [4])
    long = TokenizedPair([1, 1, 1], [2, 3], [4, 5, 6, 7, 8, 9])
    with pytest.raises(ValueError, match=r"pair 1: rejected sequence has 9 tokens .* max_length=8"):
        batching.pad_pairs([ok, long], max_length=8)
    with pytest.raises(ValueError, match="pair 0: chosen_ids is empty"):
        batching.pad_pairs([TokenizedPair([1], [], [2])], max_length=8)
    with pytest.raises(ValueError, match="pair 0: prompt_ids is empty"):
        batching.pad_pairs([TokenizedPair([], [1], [2])], max_length=8)
    with pytest.raises(ValueError, match="pair 0: rejected_ids .* integer"):
        batching.pad_pairs([TokenizedPair([1], [2], ["a"])], max_length=8)
    with pytest.raises(ValueError, match="outside"):
        batching.pad_pairs([TokenizedPair([-1], [2], [3])], max_length=8)
    with pytest.raises(ValueError, match="3 pairs for batch_size=2"):
        batching.pad_pairs([ok] * 3, max_length=8, batch_size=2)
    with pytest.raises(ValueError, match="no pairs"):
        batching.pad_pairs([], max_length=8)
    with pytest.raises(TypeError, match="pair 0"):
        batching.pad_pairs([{"prompt_ids": [1]}], max_length=8)


def test_pad_pairs_empty_with_batch_size_is_all_padding():
    batch = batching.pad_pairs([], max_length=8, pad_to_multiple_of=4, batch_size=3)
    assert batch["tokens"].shape == (3, 2, 4)
    assert batch["pair_mask"].tolist() == [0, 0, 0]
    assert batching.padding_fraction(batch) == 1.0


def test_pad_pairs_ref_logps():
    pairs = [TokenizedPair([1], [2], [3]), TokenizedPair([1], [4], [5])]
    batch = batching.pad_pairs(pairs, max_length=4, batch_size=3, ref_logps=[[-1, -2], [-3, -4]])
    assert batch["ref_logps"].dtype == np.float32
    np.testing.assert_array_equal(batch["ref_logps"], [[-1, -2], [-3, -4], [0, 0]])
    with pytest.raises(ValueError, match="shape"):
        batching.pad_pairs(pairs, max_length=4, ref_logps=[[-1, -2]])
    with pytest.raises(ValueError, match="record 1 is not finite"):
        batching.pad_pairs(pairs, max_length=4, ref_logps=[[-1, -2], [np.nan, 0]])


# --- packed --------------------------------------------------------------------------


@fast
@given(pairs_st, st.integers(1, 3), st.integers(12, 20), st.integers(1, 6), st.integers(0, 9))
def test_pack_layout_and_sums_match_padded(pairs, num_rows, row_length, max_pairs, seed):
    if num_rows == 1:
        row_length = 24  # one row must hold both sides of any pair (max 2 * 12 tokens)
    plan = batching.plan_packing(
        pairs, num_rows=num_rows, row_length=row_length, max_pairs=max_pairs
    )
    batch, leftover = pack_pairs(
        pairs, num_rows=num_rows, row_length=row_length, max_pairs=max_pairs, pad_id=PAD
    )
    for key in (*PAD_KEYS, "slot_ids"):
        assert batch[key].shape == (num_rows, row_length) and batch[key].dtype == np.int32
    assert batch["pair_mask"].shape == (max_pairs,)
    packed = [pairs[i] for i in plan.packed]
    assert leftover == [pairs[i] for i in plan.leftover]
    assert sorted(plan.packed + plan.leftover) == list(range(len(pairs)))
    assert 1 <= len(packed) <= max_pairs  # the first pair always fits
    assert 0 in plan.packed
    assert batch["pair_mask"].tolist() == [1] * len(packed) + [0] * (max_pairs - len(packed))

    unpacked = _unpack_sequences(batch)
    assert set(unpacked) == {2 * b + s for b in range(len(packed)) for s in (0, 1)}
    for b, pair in enumerate(packed):
        for side, (prompt, response) in enumerate(_sides(pair)):
            assert unpacked[2 * b + side] == (list(prompt), list(response))

    table = _value_table(seed)
    padded = batching.pad_pairs(packed, max_length=row_length, batch_size=max_pairs)
    np.testing.assert_allclose(
        pair_sums(table[batch["tokens"], batch["positions"]], batch),
        pair_sums(table[padded["tokens"], padded["positions"]], padded),
        rtol=1e-12,
    )
    np.testing.assert_array_equal(pair_token_counts(batch), pair_token_counts(padded))
    assert batching.padding_fraction(batch) == pytest.approx(
        1 - sum(len(p) + len(r) for pair in packed for p, r in _sides(pair)) / batch["tokens"].size
    )


@fast
@given(st.lists(pair_st, min_size=1, max_size=30), st.integers(1, 5), st.integers(12, 16))
def test_pack_calls_lose_and_duplicate_no_pair(pairs, chunk, row_length):
    """Streaming: feed `chunk` new pairs per call, leftovers first; all pairs come out once."""
    seen = collections.Counter()
    buffer, stream, calls = [], list(pairs), 0
    while stream or buffer:
        buffer = buffer + stream[:chunk]
        stream = stream[chunk:]
        batch, buffer = pack_pairs(buffer, num_rows=2, row_length=row_length, max_pairs=3)
        seq = _unpack_sequences(batch)
        for slot_pair in range(int(batch["pair_mask"].sum())):
            (prompt, chosen), (_, rejected) = seq[2 * slot_pair], seq[2 * slot_pair + 1]
            seen[(tuple(prompt), tuple(chosen), tuple(rejected))] += 1
        calls += 1
        assert calls <= 2 * len(pairs) + 1, "packing made no progress"
    expected = collections.Counter(
        (tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in pairs
    )
    assert seen == expected


def test_pack_splits_a_pair_across_rows_and_leaves_the_rest():
    big = TokenizedPair([1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12])  # 8 + 7 tokens
    small = TokenizedPair([1], [2], [3])  # 2 + 2 tokens
    batch, leftover = pack_pairs([small, big, small], num_rows=2, row_length=10, max_pairs=4)
    # small (forced first) -> row 0: [c0 r0]; big: chosen (8) -> row 1, rejected (7) -> none.
    assert leftover == [big]
    assert batch["pair_mask"].tolist() == [1, 1, 0, 0]
    np.testing.assert_array_equal(batch["slot_ids"], [[0, 0, 1, 1, 2, 2, 3, 3, -1, -1], [-1] * 10])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 2, 2, 3, 3, 4, 4, 0, 0], [0] * 10])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1] * 4 + [0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 1] * 4 + [0, 0])

    batch, leftover = pack_pairs([big], num_rows=2, row_length=10, max_pairs=1)
    assert leftover == []
    np.testing.assert_array_equal(batch["slot_ids"], [[0] * 8 + [-1] * 2, [1] * 7 + [-1] * 3])
    np.testing.assert_array_equal(pair_token_counts(batch), [[5, 4]])


def test_pack_max_pairs_and_decreasing_order():
    pairs = [
        TokenizedPair([1], [2], [3]),
        TokenizedPair([1], [2, 2], [3]),
        TokenizedPair([1], [2, 2, 2], [3]),
        TokenizedPair([1], [2, 2, 2, 2], [3]),
    ]
    plan = batching.plan_packing(pairs, num_rows=4, row_length=16, max_pairs=2)
    # pairs[0] first (progress guarantee), then the longest remaining one.
    assert plan.packed == [0, 3] and plan.leftover == [1, 2]


def test_pack_too_long_sequence_names_the_pair():
    pairs = [TokenizedPair([1], [2], [3]), TokenizedPair([1] * 5, [2] * 6, [3])]
    with pytest.raises(ValueError, match=r"pair 1: chosen sequence has 11 tokens > row_length=10"):
        pack_pairs(pairs, num_rows=4, row_length=10, max_pairs=4)
    # With one row, both sides must share it: a pair longer than the row never fits.
    pairs = [TokenizedPair([1], [2], [3]), TokenizedPair([1] * 3, [2] * 3, [3] * 2)]
    with pytest.raises(ValueError, match=r"pair 1: chosen \+ rejected .* 11 tokens .* num_rows=1"):
        pack_pairs(pairs, num_rows=1, row_length=10, max_pairs=4)


def test_pack_empty_input_and_ref_logps():
    batch, leftover = pack_pairs([], num_rows=2, row_length=8, max_pairs=3)
    assert leftover == [] and batch["pair_mask"].tolist() == [0, 0, 0]
    assert batching.padding_fraction(batch) == 1.0
    assert (batch["slot_ids"] == -1).all()

    pairs = [
        TokenizedPair([1], [2] * 3, [3]),
        TokenizedPair([1], [2], [3]),
        TokenizedPair([1], [4], [5]),
    ]
    plan = batching.plan_packing(pairs, num_rows=1, row_length=10, max_pairs=3)
    # 6 tokens of pair 0 leave room for one 4-token pair; equal sizes go in input order.
    assert plan.packed == [0, 1] and plan.leftover == [2]
    ref = np.array([[-1, -2], [-3, -4], [-5, -6]], np.float32)
    batch = batching.packed_batch(pairs, plan, row_length=10, max_pairs=3, ref_logps=ref)
    np.testing.assert_array_equal(batch["ref_logps"][:2], ref[plan.packed])
    np.testing.assert_array_equal(batch["ref_logps"][2], [0, 0])


# --- SFT -----------------------------------------------------------------------------

seq_st = st.builds(TokenizedSequence, prompt_ids=ids, completion_ids=ids)


@fast
@given(st.lists(seq_st, min_size=1, max_size=6), st.integers(0, 3))
def test_pad_sequences_layout(seqs, extra):
    batch = batching.pad_sequences(
        seqs, max_length=12, pad_id=PAD, buckets=[4, 8], batch_size=len(seqs) + extra
    )
    L = batch["tokens"].shape[-1]
    assert L in (4, 8, 12)
    for key in PAD_KEYS:
        assert batch[key].shape == (len(seqs) + extra, L) and batch[key].dtype == np.int32
    assert batch["example_mask"].tolist() == [1] * len(seqs) + [0] * extra
    for i, seq in enumerate(seqs):
        row = [batch[k][i] for k in PAD_KEYS]
        _check_padded_row(*row, seq.prompt_ids, seq.completion_ids)
    for key in PAD_KEYS:
        assert (batch[key][len(seqs) :] == 0).all()


def test_pad_sequences_errors():
    with pytest.raises(ValueError, match=r"sequence 1: 7 tokens .* max_length=6"):
        batching.pad_sequences(
            [TokenizedSequence([1], [2]), TokenizedSequence([1, 1, 1], [2, 2, 2, 2])],
            max_length=6,
        )
    with pytest.raises(ValueError, match="sequence 0: completion_ids is empty"):
        batching.pad_sequences([TokenizedSequence([1], [])], max_length=6)


def test_pair_sums_rejects_wrong_shape():
    batch = batching.pad_pairs([TokenizedPair([1], [2], [3])], max_length=4)
    with pytest.raises(ValueError, match="shape"):
        pair_sums(np.zeros((1, 4)), batch)


# --- cross-checks with the neighbouring modules ----------------------------------------


def test_numpy_pair_sums_match_logprobs_pair_sums():
    from dpo_jax import logprobs

    pairs = [
        TokenizedPair([1, 2], [3, 4, 5], [6]),
        TokenizedPair([7], [8], [9, 10, 11, 12]),
        TokenizedPair([1, 2, 3], [4], [5, 6]),
    ]
    batch, leftover = pack_pairs(pairs, num_rows=2, row_length=12, max_pairs=4)
    assert leftover == []
    values = np.random.default_rng(0).normal(size=batch["tokens"].shape).astype(np.float32)
    expected = logprobs.pair_sums(
        values, batch["slot_ids"], batch["pair_mask"].shape[0], mask=batch["loss_mask"]
    )
    np.testing.assert_allclose(pair_sums(values, batch), expected, rtol=1e-6, atol=1e-6)


def test_synthetic_records_tokenize_and_batch(tmp_path):
    from dpo_jax.data import synthetic, tokenize
    from dpo_jax.data.examples import PreferenceExample

    tok = synthetic.build_char_tokenizer(tmp_path / "tok")
    config = tokenize.TokenizeConfig(max_length=24, max_prompt_length=12)
    pairs = [
        tokenize.tokenize_pair(PreferenceExample(**r), tok, config)
        for r in synthetic.make_preference_records(6, seed=0)
    ]
    for pair, record in zip(pairs, synthetic.make_preference_records(6, seed=0), strict=True):
        assert pair.prompt_ids[0] == tok.bos_token_id
        assert pair.chosen_ids[-1] == tok.eos_token_id
        assert tok.decode(pair.chosen_ids[:-1]) == record["chosen"]
    padded = batching.pad_pairs(pairs, max_length=24, pad_id=tok.pad_token_id, pad_to_multiple_of=8)
    packed, leftover = pack_pairs(pairs, num_rows=6, row_length=40, max_pairs=6)
    assert leftover == []
    counts = [[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]
    np.testing.assert_array_equal(pair_token_counts(padded), counts)
    np.testing.assert_array_equal(pair_token_counts(packed), counts)
