"""`blocked_attention` against the einsum: the same outputs at every real token and the
same gradients of a loss over real tokens (float32 1e-5), on padded rows, packed rows,
packed rows whose responses share a prompt (prefix_segment_ids), and under a sliding
window; GQA and a single kv head; block sizes that do and do not divide L. Also: the work
list holds every block pair with a visible key and, for plain packing, nothing else."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_attention_impls import check_against_xla, packed_batch

from dpo_jax import parallel
from dpo_jax.models import ModelConfig, attention
from dpo_jax.models.blocked_attention import blocked_attention, make_schedule


def rule_mask(segment_ids, positions, prefix_segment_ids, sliding_window):
    """[B, 1, 1, L, L] bool, the rule of the blocked module's docstring, written out."""
    seg, pre = np.asarray(segment_ids), np.asarray(prefix_segment_ids)
    idx = np.arange(seg.shape[1])
    seg_q, seg_k, pre_q = seg[:, :, None], seg[:, None, :], pre[:, :, None]
    mask = (idx[None, None, :] <= idx[None, :, None]) & (seg_k != 0)
    mask &= (seg_k == seg_q) | ((pre_q != 0) & (seg_k == pre_q))
    if sliding_window is not None:
        pos = np.asarray(positions)
        mask &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    return mask[:, None, None]


def make_rows(layout: str, length: int = 40):
    """segment_ids, positions, prefix_segment_ids [2, length] int32.

    padded: one sequence per row, the second 5/8 full. packed: 3 and 2 sequences, then
    padding. shared: row 0 holds a prompt (segment 1) and two responses reading it
    (segments 2, 3, prefix 1), then a plain sequence; row 1 is all padding (a row with
    no visible key at all)."""
    lengths = {
        "padded": [[length], [length * 5 // 8]],
        "packed": [[7, 12, 9], [20, 15]],
        "shared": [[8, 12, 11, 6], []],
    }[layout]
    seg, pos, pre = (np.zeros((2, length), np.int32) for _ in range(3))
    for row, sizes in enumerate(lengths):
        start = 0
        for segment, n in enumerate(sizes, start=1):
            seg[row, start : start + n] = segment
            pos[row, start : start + n] = np.arange(n)
            start += n
    if layout == "shared":
        # The responses continue the prompt's positions, as in the unshared sequences.
        pre[0, 8:31] = 1
        pos[0, 8:31] = 8 + np.concatenate([np.arange(12), np.arange(11)])
    return seg, pos, pre


def qkv(heads: int, kv_heads: int, length: int = 40, dtype=jnp.float32):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    shapes = [(2, length, heads, 8), (2, length, kv_heads, 8), (2, length, kv_heads, 8)]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def outputs_and_grads(fn, q, k, v, segment_ids):
    """fn(q, k, v) and d/d(q, k, v) of a weighted sum of its outputs at real tokens."""
    real = jnp.asarray(segment_ids != 0)[..., None, None]
    weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32) * real

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_same(actual, expected, segment_ids, tol):
    (out, grads), (ref_out, ref_grads) = actual, expected
    real = segment_ids != 0
    np.testing.assert_allclose(
        np.asarray(out[real], np.float32), np.asarray(ref_out[real], np.float32), **tol
    )
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        assert not np.isnan(np.asarray(g, np.float32)).any(), f"NaN in d{name}"
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(ref, np.float32), err_msg=f"d{name}", **tol
        )


FLOAT32 = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize(
    "layout, heads, block_size, window",
    [
        ("padded", (4, 2), 16, None),  # 40 = 2.5 blocks: padded up to 48 for the call
        ("packed", (4, 2), 8, None),
        ("packed", (4, 1), 128, None),  # one block: the whole row
        ("packed", (2, 2), 8, 5),  # the window binds inside segments
    ],
)
def test_equals_xla_attention(layout, heads, block_size, window):
    seg, pos, _ = make_rows(layout)
    q, k, v = qkv(*heads)
    expected = outputs_and_grads(
        lambda q, k, v: attention.xla_attention(q, k, v, seg, pos, window), q, k, v, seg
    )
    actual = outputs_and_grads(
        lambda q, k, v: blocked_attention(q, k, v, seg, pos, window, block_size=block_size),
        *(q, k, v),
        seg,
    )
    assert_same(actual, expected, seg, FLOAT32)
    # Padding queries see no key: 0 out (the einsum averages v instead; nothing reads it).
    np.testing.assert_array_equal(actual[0][seg == 0], 0.0)


@pytest.mark.parametrize("block_size, window", [(8, None), (16, 4)])
def test_prefix_segments_equal_the_rule_mask(block_size, window):
    """Responses read their prompt through prefix_segment_ids, never each other; row 1 is
    all padding and must come out finite (its outputs 0, its gradients 0)."""
    seg, pos, pre = make_rows("shared")
    q, k, v = qkv(4, 2)
    mask = rule_mask(seg, pos, pre, window)
    expected = outputs_and_grads(
        lambda q, k, v: attention.masked_attention(q, k, v, jnp.asarray(mask)), q, k, v, seg
    )
    # The rule as written here is the rule of the "xla" implementation.
    np.testing.assert_array_equal(attention.attention_mask(pos, seg, window, pre), mask)
    blocked = lambda q, k, v: blocked_attention(  # noqa: E731
        q, k, v, seg, pos, window, pre, block_size=block_size
    )
    actual = outputs_and_grads(blocked, q, k, v, seg)
    assert_same(actual, expected, seg, FLOAT32)
    np.testing.assert_array_equal(actual[0][1], 0.0)


def test_bfloat16_within_bfloat16_tolerance():
    seg, pos, pre = make_rows("shared")
    q, k, v = qkv(4, 2, dtype=jnp.bfloat16)
    mask = jnp.asarray(rule_mask(seg, pos, pre, None))
    expected = outputs_and_grads(
        lambda q, k, v: attention.masked_attention(q, k, v, mask), q, k, v, seg
    )
    actual = outputs_and_grads(
        lambda q, k, v: blocked_attention(q, k, v, seg, pos, None, pre, block_size=8), q, k, v, seg
    )
    assert actual[0].dtype == jnp.bfloat16 and actual[1][0].dtype == jnp.bfloat16
    assert_same(actual, expected, seg, {"atol": 5e-2, "rtol": 5e-2})


def test_under_a_mesh_runs_per_shard_and_equals_the_unsharded_call():
    """Rows over "data", heads over "tensor" (2 q heads and 1 kv head per shard): each
    device builds the work list of its own rows, in the shard_map `jax.set_mesh` selects."""
    seg, pos, pre = make_rows("shared")
    q, k, v = qkv(4, 2)
    blocked = lambda q, k, v, s, p, r: blocked_attention(  # noqa: E731
        q, k, v, s, p, None, r, block_size=8
    )
    expected = outputs_and_grads(lambda q, k, v: blocked(q, k, v, seg, pos, pre), q, k, v, seg)

    mesh = parallel.make_mesh((2, 1, 2), devices=jax.devices()[:4])
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    q, k, v, *ints = (jax.device_put(x, rows) for x in (q, k, v, seg, pos, pre))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        assert "shard_map" in str(jax.make_jaxpr(blocked)(q, k, v, *ints))
        actual = outputs_and_grads(lambda q, k, v: blocked(q, k, v, *ints), q, k, v, seg)
    assert_same(actual, expected, seg, FLOAT32)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_config_blocked_equals_xla_through_the_model(family):
    """attention="blocked" in a 1-layer model on packed rows of 256 (segments of 64 to 128
    tokens, so the 64-token blocks skip across them): logits and parameter gradients."""
    config = ModelConfig.tiny(family, num_layers=1)
    check_against_xla(config, "blocked", packed_batch(256))


def block_pairs(schedule):
    count = int(schedule.count)
    rows, q_blocks, k_blocks = (np.asarray(x)[:count] for x in schedule[:3])
    return set(zip(rows.tolist(), q_blocks.tolist(), k_blocks.tolist(), strict=True))


def needed_pairs(mask, block_size):
    """(row, query block, key block) of every block pair holding a visible key."""
    B, L = mask.shape[0], mask.shape[-1]
    nb = L // block_size
    any_visible = mask.reshape(B, nb, block_size, nb, block_size).any(axis=(2, 4))
    return {tuple(x) for x in np.argwhere(any_visible).tolist()}


def test_schedule_visits_exactly_the_blocks_with_a_visible_key():
    seg, pos, pre = make_rows("packed", length=48)
    schedule = make_schedule(jnp.asarray(seg), jnp.asarray(pre), 8)
    expected = needed_pairs(rule_mask(seg, pos, pre, None)[:, 0, 0], 8)
    assert block_pairs(schedule) == expected
    # Of the 2 * 6 * 7 / 2 = 42 block pairs on or below the diagonal, most are skipped.
    assert int(schedule.count) == len(expected) < 42 * 2 // 3


def test_schedule_with_prefixes_skips_the_other_response():
    """The rejected response (tokens 20-30) reads its prompt (block 0) and itself (blocks
    2-3), not the chosen response's block 1 (tokens 8-15), which lies between them."""
    seg, pos, pre = make_rows("shared", length=48)
    visited = block_pairs(make_schedule(jnp.asarray(seg), jnp.asarray(pre), 8))
    assert visited == needed_pairs(rule_mask(seg, pos, pre, None)[:, 0, 0], 8)
    assert (0, 3, 0) in visited and (0, 3, 1) not in visited
    assert not any(row == 1 for row, _, _ in visited)  # the all-padding row costs nothing


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"k": np.zeros((2, 40, 3, 8), np.float32), "v": np.zeros((2, 40, 3, 8), np.float32)},
            r"q heads N a multiple of kv heads K",
        ),
        ({"segment_ids": np.zeros((2, 39), np.int32)}, r"segment_ids shape \(2, 39\)"),
        ({"block_size": 0}, "block_size must be a positive int, got 0"),
    ],
)
def test_bad_inputs_are_named(change, message):
    seg, pos, pre = make_rows("packed")
    q, k, v = qkv(4, 2)
    args = {"q": q, "k": k, "v": v, "segment_ids": seg, "positions": pos, "block_size": 8}
    with pytest.raises(ValueError, match=message):
        blocked_attention(**{**args, **change})
