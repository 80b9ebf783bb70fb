"""Tests for dpo_jax.logprobs: alignment, masks, pair sums, the chunked custom-VJP path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs

B, L, D, V = 3, 13, 16, 50

# Jitted once per shape: eager dispatch of many small ops is slow on a loaded CPU.
token_logps = jax.jit(logprobs.token_logps)
from_features = jax.jit(
    logprobs.token_logps_from_features, static_argnames=("chunk_size", "vocab_chunk_size")
)


def _inputs(seed=0, batch=B, length=L, width=D, vocab=V):
    """Random float32 hidden [B, L, D], unembed [D, V], tokens [B, L], 0/1 mask [B, L]."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
    unembed = (0.7 * rng.normal(size=(width, vocab))).astype(np.float32)
    tokens = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    mask = (rng.random((batch, length)) < 0.6).astype(np.int32)
    return tuple(map(jnp.asarray, (hidden, unembed, tokens, mask)))


def _numpy_token_logps(logits, tokens):
    logits = np.asarray(logits, np.float64)
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            row = logits[b, t - 1]
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            out[b, t] = row[tokens[b, t]] - lse
    return out


def test_token_logps_shift_convention():
    hidden, unembed, tokens, _ = _inputs()
    logits = hidden @ unembed
    got = token_logps(logits, tokens)
    assert got.shape == (B, L) and got.dtype == jnp.float32
    np.testing.assert_array_equal(got[:, 0], 0.0)
    np.testing.assert_allclose(got, _numpy_token_logps(logits, np.asarray(tokens)), rtol=1e-5)
    # Entry t only depends on logits[t-1] and tokens[t]: changing logits at the last position
    # changes nothing; changing tokens[:, 0] changes nothing.
    changed = logits.at[:, -1].add(5.0)
    np.testing.assert_array_equal(token_logps(changed, tokens), got)
    np.testing.assert_array_equal(token_logps(logits, tokens.at[:, 0].set(7)), got)


def test_token_logps_bfloat16_logits_use_float32_math():
    hidden, unembed, tokens, _ = _inputs()
    logits = (hidden @ unembed).astype(jnp.bfloat16)
    got = token_logps(logits, tokens)
    assert got.dtype == jnp.float32
    want = _numpy_token_logps(np.asarray(logits.astype(jnp.float32)), np.asarray(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logps_leading_pair_axis():
    hidden, unembed, tokens, _ = _inputs(batch=4)
    logits = (hidden @ unembed).reshape(2, 2, L, V)
    got = token_logps(logits, tokens.reshape(2, 2, L))
    want = token_logps(hidden @ unembed, tokens)
    np.testing.assert_array_equal(got.reshape(4, L), want)


def _loss(hidden, unembed, tokens, mask, weights, chunk_size=None, vocab_chunk_size=None):
    """Weighted masked log-prob sum; naive logits path (float32) when chunk_size is None."""
    if chunk_size is None:
        logits = hidden.astype(jnp.float32) @ unembed.astype(jnp.float32)
        logps = logprobs.token_logps(logits, tokens)
    else:
        logps = logprobs.token_logps_from_features(
            hidden, unembed, tokens, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
        )
    return logprobs.masked_sum(logps * weights, mask).sum(), logps


value_and_grad = jax.jit(
    jax.value_and_grad(_loss, (0, 1), has_aux=True),
    static_argnames=("chunk_size", "vocab_chunk_size"),
)


@pytest.mark.parametrize(
    "chunk_size,vocab_chunk_size",
    [(4, None), (5, 7), (256, 8192), (1, 13), (3, 49), (12, 1)],
)
def test_features_path_matches_naive_values_and_grads(chunk_size, vocab_chunk_size):
    # L - 1 = 12 positions: chunk sizes 4, 1 and 12 divide it, 5 does not, 256 > L;
    # vocab blocks 7, 13, 49 don't divide V = 50 (the last block overlaps the previous one).
    hidden, unembed, tokens, mask = _inputs()
    weights = jnp.asarray(
        np.random.default_rng(9).normal(size=(B, L)), jnp.float32
    )  # a general output cotangent
    (loss_n, logps_n), grads_n = value_and_grad(hidden, unembed, tokens, mask, weights)
    (loss_e, logps_e), grads_e = value_and_grad(
        hidden, unembed, tokens, mask, weights, chunk_size, vocab_chunk_size
    )
    np.testing.assert_array_equal(logps_e[:, 0], 0.0)
    np.testing.assert_allclose(logps_e, logps_n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_e, loss_n, rtol=1e-5)
    for g_e, g_n in zip(grads_e, grads_n, strict=True):
        assert g_e.dtype == jnp.float32
        assert float(jnp.abs(g_n).max()) > 1e-3  # the comparison is not vacuous
        np.testing.assert_allclose(g_e, g_n, rtol=1e-5, atol=1e-5)


def test_features_path_bfloat16_inputs_logsumexp_in_float32():
    hidden, unembed, tokens, mask = _inputs(seed=1)
    hidden16, unembed16 = hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16)
    ones = jnp.ones((B, L))
    # Products of bfloat16 numbers are exact in float32, so with float32 accumulation and a
    # float32 logsumexp the result equals the float32 path on the upcast inputs.
    (_, want), grads_n = value_and_grad(hidden16, unembed16, tokens, mask, ones)
    (_, got), grads_e = value_and_grad(hidden16, unembed16, tokens, mask, ones, 5, 16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g_e, g_n in zip(grads_e, grads_n, strict=True):
        assert g_e.dtype == jnp.bfloat16
        # The logits cotangent is cast to bfloat16 before the matmuls (as autodiff of a
        # bfloat16 matmul does), hence a bfloat16-sized tolerance on the gradients.
        np.testing.assert_allclose(
            g_e.astype(jnp.float32), g_n.astype(jnp.float32), rtol=2e-2, atol=2e-2
        )


def test_features_path_leading_dims_and_short_sequences():
    hidden, unembed, tokens, _ = _inputs(batch=4)
    want = from_features(hidden, unembed, tokens, chunk_size=4)
    got = from_features(hidden.reshape(2, 2, L, D), unembed, tokens.reshape(2, 2, L), chunk_size=4)
    np.testing.assert_array_equal(got.reshape(4, L), want)
    one = from_features(hidden[:, :1], unembed, tokens[:, :1])
    np.testing.assert_array_equal(one, np.zeros((4, 1)))
    two = from_features(hidden[:, :2], unembed, tokens[:, :2])
    np.testing.assert_allclose(two, token_logps(hidden[:, :2] @ unembed, tokens[:, :2]), rtol=1e-5)


def test_out_of_range_targets_are_nan_and_dropped_by_masks():
    hidden, unembed, tokens, mask = _inputs(seed=2)
    # Target -1 on every row's last token (unscored), target V at row 0, t = L-2 (unscored).
    bad = tokens.at[:, -1].set(-1).at[0, -2].set(V)
    mask = mask.at[:, -1].set(0).at[0, -2].set(0).at[:, 1].set(1)
    ones = jnp.ones((B, L))
    for chunk_size in (None, 4):
        (value, logps), grads = value_and_grad(hidden, unembed, bad, mask, ones, chunk_size)
        nan = np.zeros((B, L), bool)
        nan[:, -1] = nan[0, -2] = True
        np.testing.assert_array_equal(np.isnan(logps), nan)
        assert np.isfinite(value)
        assert all(np.isfinite(g).all() for g in grads)
        # Scoring an out-of-range target is loud, not silently wrong.
        assert np.isnan(logprobs.masked_sum(logps, mask.at[0, -2].set(1))[0])


def test_masked_sum_mean_counts():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 9)).astype(np.float32)
    mask = (rng.random((4, 9)) < 0.5).astype(np.int32)
    mask[2] = 0  # a sequence with nothing scored
    values[mask == 0] = np.nan  # masked entries never leak, even NaN
    counts = mask.sum(-1)
    sums = np.array([values[b][mask[b] == 1].sum() for b in range(4)])
    np.testing.assert_allclose(logprobs.masked_sum(values, mask), sums, rtol=1e-6)
    np.testing.assert_array_equal(logprobs.token_counts(mask), counts.astype(np.float32))
    means = logprobs.masked_mean(values, mask)
    np.testing.assert_allclose(means, sums / np.maximum(counts, 1), rtol=1e-6)
    assert means[2] == 0.0
    with pytest.raises(ValueError, match="masked_sum.*mask shape"):
        logprobs.masked_sum(values, mask[:, :-1])


def test_pair_sums_matches_numpy_loop():
    rng = np.random.default_rng(1)
    rows, length, num_pairs = 5, 16, 4
    values = rng.normal(size=(rows, length)).astype(np.float32)
    slot_ids = rng.integers(-1, 2 * num_pairs, size=(rows, length)).astype(np.int32)
    mask = (rng.random((rows, length)) < 0.7).astype(np.int32)
    want = np.zeros((num_pairs, 2))
    want_counts = np.zeros((num_pairs, 2))
    want_unmasked = np.zeros((num_pairs, 2))
    for r in range(rows):
        for t in range(length):
            slot = slot_ids[r, t]
            if slot < 0:
                continue
            want_unmasked[slot // 2, slot % 2] += values[r, t]
            if mask[r, t]:
                want[slot // 2, slot % 2] += values[r, t]
                want_counts[slot // 2, slot % 2] += 1
    got = jax.jit(logprobs.pair_sums, static_argnums=2)(values, slot_ids, num_pairs, mask)
    assert got.shape == (num_pairs, 2) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        logprobs.pair_sums(values, slot_ids, num_pairs), want_unmasked, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(logprobs.pair_sums(mask, slot_ids, num_pairs), want_counts)
    with pytest.raises(ValueError, match="pair_sums"):
        logprobs.pair_sums(values, slot_ids[:, :-1], num_pairs)


def test_packed_pair_sums_equal_padded_sequence_sums():
    """Two pairs packed into one row give the same per-pair sums as the padded layout."""
    hidden, unembed, tokens, _ = _inputs(seed=3, batch=1, length=20)
    logits = hidden @ unembed
    # Row layout: pair 0 chosen [0, 6), pair 0 rejected [6, 11), pair 1 chosen [11, 20).
    slot_ids = np.array([[0] * 6 + [1] * 5 + [2] * 9], np.int32)
    loss_mask = np.zeros((1, 20), np.int32)
    loss_mask[0, [3, 4, 5, 8, 9, 10, 15, 16, 17, 18, 19]] = 1
    packed = logprobs.pair_sums(token_logps(logits, tokens), slot_ids, 2, loss_mask)
    logits, tokens = np.asarray(logits), np.asarray(tokens)
    segments = {(0, 0): (0, 6), (0, 1): (6, 11), (1, 0): (11, 20)}
    for (pair, side), (start, stop) in segments.items():
        seg = _numpy_token_logps(logits[:, start:stop], tokens[:, start:stop])
        want = (seg * loss_mask[:, start:stop]).sum()
        np.testing.assert_allclose(packed[pair, side], want, rtol=1e-5)
    assert packed[1, 1] == 0.0


def test_bad_shapes_raise_clear_errors():
    hidden, unembed, tokens, _ = _inputs()
    with pytest.raises(ValueError, match="token_logps: tokens shape"):
        logprobs.token_logps(hidden @ unembed, tokens[:, :-1])
    with pytest.raises(TypeError, match="tokens must be integers"):
        logprobs.token_logps(hidden @ unembed, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="unembed \\[D, V\\]"):
        logprobs.token_logps_from_features(hidden, unembed.T, tokens)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        logprobs.token_logps_from_features(hidden, unembed, tokens, chunk_size=0)


def test_features_path_compiled_temp_memory_much_smaller():
    """Compile only (ShapeDtypeStructs, nothing allocated): temp bytes of value-and-grad."""
    batch, length, width, vocab = 2, 1024, 32, 16384
    args = (
        jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
        jax.ShapeDtypeStruct((width, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
    )

    def naive(hidden, unembed, tokens, mask):
        logps = logprobs.token_logps(hidden @ unembed, tokens)
        return logprobs.masked_sum(logps, mask).sum()

    def efficient(hidden, unembed, tokens, mask):
        logps = logprobs.token_logps_from_features(
            hidden, unembed, tokens, chunk_size=64, vocab_chunk_size=4096
        )
        return logprobs.masked_sum(logps, mask).sum()

    def temp_bytes(loss):
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = batch * length * vocab * 4
    naive_temp, efficient_temp = temp_bytes(naive), temp_bytes(efficient)
    assert naive_temp >= logits_bytes  # the naive path does hold [B, L, V] float32
    assert efficient_temp * 10 < naive_temp, (naive_temp, efficient_temp)
