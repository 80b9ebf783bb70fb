"""Blocked attention that visits only the key blocks a query block can see.

    out = blocked_attention(q, k, v, segment_ids, positions, sliding_window=None,
                            prefix_segment_ids=None, block_size=64)

q: [B, L, N, H]; k, v: [B, L, K, H] (N a multiple of K, query head n reads kv head n // G,
G = N / K); segment_ids, positions, prefix_segment_ids: [B, L] int32; out: [B, L, N, H]
in q's dtype. The math is `attention.masked_attention` under the mask rule of
`dpo_jax.models.attention`: key k is visible to query q iff

    k <= q  and  seg[k] != 0  and  (seg[k] == seg[q]  or  (prefix[q] != 0 and
    seg[k] == prefix[q]))  and  (window set)  pos[q] - pos[k] < sliding_window

(prefix_segment_ids=None is all zeros: the plain causal same-segment mask of
`attention.attention_mask`). A prefix lets one segment read another one earlier in the
row, e.g. a rejected response reading the prompt it shares with the chosen response.

Why: a packed row of 768 tokens holds several sequences, and the einsum computes all
[L, L] scores, most of them masked (across segments, above the diagonal). Here queries
and keys are tiled in blocks of `block_size` and the work is a list of (row, query block,
key block) triples, built at run time from the segment ids: a query block visits key
blocks from the first one of the earliest segment it holds up to its own diagonal block,
and the blocks of the prefix segments its tokens name; query blocks of pure padding
visit nothing. Cost follows the real segment lengths. The sliding window is applied
inside blocks only: it never narrows the list (a window much shorter than a segment
would leave more blocks to skip; not done).

The list has a static capacity (every block on or below the diagonal of every row) and a
data-dependent length, so the loops over it are while loops, which JAX cannot
differentiate in reverse; a custom VJP therefore runs the flash-attention backward
(Dao 2023, arXiv 2307.08691) over the same list, recomputing each block's probabilities
from the forward's saved log-sum-exp. Scores, the online softmax and every accumulator are
float32 whatever the input dtype; the probabilities meet v in v's dtype, as in the einsum.

Padding queries (segment 0) see no key: their output is 0 (the einsum gives them a
uniform average instead; nothing reads either), and the gradients they pass back are 0,
never NaN.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

_NEG_INF = float(np.finfo(np.float32).min)


class Schedule(NamedTuple):
    """The work list: entries t < count are (row[t], query_block[t], key_block[t]), ordered
    by row, then query block, then key block; later entries are unused. row, query_block,
    key_block: [T] int32 with T = B * nb * (nb + 1) / 2 (every block pair on or below the
    diagonal), nb = L / block_size; count: [] int32."""

    row: jax.Array
    query_block: jax.Array
    key_block: jax.Array
    count: jax.Array


def _segment_span(segment_ids: jax.Array, wanted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The first and last index whose segment id is wanted[b, t] in row b, or (L, -1) when
    none is: two [B, L] int32. segment_ids, wanted: [B, L] int. A stable sort puts equal
    ids in index order, so a run's ends are its extreme indices: O(L log L), not [L, L]."""
    length = segment_ids.shape[1]

    def row(ids, want):
        order = jnp.argsort(ids, stable=True)
        ordered = ids[order]
        first = jnp.minimum(jnp.searchsorted(ordered, want, side="left"), length - 1)
        last = jnp.maximum(jnp.searchsorted(ordered, want, side="right") - 1, 0)
        found = ordered[first] == want
        return (
            jnp.where(found, order[first], length).astype(jnp.int32),
            jnp.where(found, order[last], -1).astype(jnp.int32),
        )

    return jax.vmap(row)(segment_ids, wanted)


def make_schedule(segment_ids: jax.Array, prefix_segment_ids: jax.Array, block_size: int):
    """The (row, query block, key block) triples that hold a visible key, as a `Schedule`.
    segment_ids, prefix_segment_ids: [B, L] int32 with L a multiple of block_size.

    A query block needs two ranges of key blocks: from the block holding the first token
    of the earliest segment its real tokens belong to through its diagonal block, and the
    blocks of the prefix segments its tokens name (first to last). Exactly the blocks
    with a visible key when segments are contiguous runs, as the batchers write them, and
    a query block names one prefix; a superset otherwise (a block naming the prompts of
    two pairs also visits the first pair's responses), still correct."""
    B, L = segment_ids.shape
    nb = L // block_size
    blocks = lambda x: x.reshape(B, nb, block_size)  # noqa: E731
    real = segment_ids != 0
    own_first, _ = _segment_span(segment_ids, segment_ids)
    prefix_first, prefix_last = _segment_span(segment_ids, prefix_segment_ids)
    names = real & (prefix_segment_ids != 0)
    # A query block of pure padding (and one naming no prefix) gets nb as its first block
    # and -1 as its last: an empty range.
    own_lo = blocks(jnp.where(real, own_first, L)).min(-1) // block_size
    prefix_lo = blocks(jnp.where(names, prefix_first, L)).min(-1) // block_size
    prefix_hi = blocks(jnp.where(names, prefix_last, -1)).max(-1) // block_size

    query_block, key_block = (jnp.asarray(x, jnp.int32) for x in np.tril_indices(nb))
    lo = lambda x: key_block >= x[:, query_block]  # noqa: E731
    needed = lo(own_lo) | (lo(prefix_lo) & (key_block <= prefix_hi[:, query_block]))  # [B, T/B]
    order = jnp.argsort(~needed.reshape(-1), stable=True).astype(jnp.int32)
    pair = order % query_block.size
    return Schedule(
        row=order // query_block.size,
        query_block=query_block[pair],
        key_block=key_block[pair],
        count=needed.sum().astype(jnp.int32),
    )


def _block(x: jax.Array, b, i) -> jax.Array:
    """x[b, i] for traced scalars b, i, as one dynamic slice."""
    start = (b, i) + (0,) * (x.ndim - 2)
    return jax.lax.dynamic_slice(x, start, (1, 1) + x.shape[2:])[0, 0]


def _add_block(x: jax.Array, b, i, value: jax.Array) -> jax.Array:
    """x with x[b, i] += value, as an in-place dynamic update of a loop-carried buffer."""
    start = (b, i) + (0,) * (x.ndim - 2)
    return jax.lax.dynamic_update_slice(x, (_block(x, b, i) + value)[None, None], start)


def _set_block(x: jax.Array, b, i, value: jax.Array) -> jax.Array:
    """x with x[b, i] = value, in place likewise."""
    start = (b, i) + (0,) * (x.ndim - 2)
    return jax.lax.dynamic_update_slice(x, value[None, None], start)


def _block_mask(masks, b, i, j, block_size: int, sliding_window: int | None) -> jax.Array:
    """[Q, S] bool: the module docstring's rule between query block i and key block j of
    row b. masks: (segment_ids, positions, prefix_segment_ids), each [B, nb, Q]."""
    segment_ids, positions, prefix = masks
    seg_q, seg_k = _block(segment_ids, b, i), _block(segment_ids, b, j)
    pre_q = _block(prefix, b, i)
    offsets = jnp.arange(block_size)
    causal = (j * block_size + offsets)[None, :] <= (i * block_size + offsets)[:, None]
    same = seg_k[None, :] == seg_q[:, None]
    shared = (pre_q != 0)[:, None] & (seg_k[None, :] == pre_q[:, None])
    mask = causal & (seg_k != 0)[None, :] & (same | shared)
    if sliding_window is not None:
        pos_q, pos_k = _block(positions, b, i), _block(positions, b, j)
        mask &= (pos_q[:, None] - pos_k[None, :]) < sliding_window
    return mask


def _scores(q_i, k_j, mask):
    """[K, G, Q, S] float32 scores of one block pair, masked to _NEG_INF."""
    scores = jnp.einsum("KGQH,KSH->KGQS", q_i, k_j, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores * (q_i.shape[-1] ** -0.5), _NEG_INF)


def _forward(q, k, v, masks, schedule, sliding_window, block_size):
    """Online softmax over the schedule. q: [B, nb, K, G, Q, H]; k, v: [B, nb, K, S, H];
    masks: 3 x [B, nb, Q]. Returns out (q's shape and dtype) and lse [B, nb, K, G, Q] f32."""
    acc = jnp.zeros(q.shape, jnp.float32)
    row_max = jnp.full(q.shape[:-1], _NEG_INF, jnp.float32)
    row_sum = jnp.zeros(q.shape[:-1], jnp.float32)

    def visit(t, carry):
        acc, row_max, row_sum = carry
        b, i, j = schedule.row[t], schedule.query_block[t], schedule.key_block[t]
        mask = _block_mask(masks, b, i, j, block_size, sliding_window)
        scores = _scores(_block(q, b, i), _block(k, b, j), mask)
        old_max = _block(row_max, b, i)
        new_max = jnp.maximum(old_max, scores.max(-1))
        # `where`, not the exp alone: a row with no visible key yet has new_max = _NEG_INF,
        # and exp(_NEG_INF - _NEG_INF) would count its masked keys as ones.
        probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
        rescale = jnp.exp(old_max - new_max)
        values = jnp.einsum(
            "KGQS,KSH->KGQH",
            probs.astype(v.dtype),
            _block(v, b, j),
            preferred_element_type=jnp.float32,
        )
        acc = _set_block(acc, b, i, _block(acc, b, i) * rescale[..., None] + values)
        row_sum = _set_block(row_sum, b, i, _block(row_sum, b, i) * rescale + probs.sum(-1))
        return acc, _set_block(row_max, b, i, new_max), row_sum

    acc, row_max, row_sum = jax.lax.fori_loop(0, schedule.count, visit, (acc, row_max, row_sum))
    # A query that saw no key (padding) keeps acc = 0 and row_sum = 0: output 0, lse 0.
    seen = row_sum > 0
    denominator = jnp.where(seen, row_sum, 1.0)
    out = (acc / denominator[..., None]).astype(q.dtype)
    return out, jnp.where(seen, row_max + jnp.log(denominator), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(q, k, v, masks, schedule, sliding_window, block_size):
    return _forward(q, k, v, masks, schedule, sliding_window, block_size)[0]


def _attend_fwd(q, k, v, masks, schedule, sliding_window, block_size):
    out, lse = _forward(q, k, v, masks, schedule, sliding_window, block_size)
    return out, (q, k, v, masks, schedule, out, lse)


def _attend_bwd(sliding_window, block_size, residuals, d_out):
    """Flash-attention backward over the same schedule: each block's probabilities are
    recomputed from lse, then dv += p^T dO, dS = p (dO v^T - rowsum(dO * O)), dq += dS k,
    dk += dS^T q (dS scaled as the scores were). Everything float32."""
    q, k, v, masks, schedule, out, lse = residuals
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q32, k32, v32, d_out = f32(q), f32(k), f32(v), f32(d_out)
    delta = jnp.sum(d_out * f32(out), axis=-1)  # [B, nb, K, G, Q]
    scale = q.shape[-1] ** -0.5

    def visit(t, grads):
        dq, dk, dv = grads
        b, i, j = schedule.row[t], schedule.query_block[t], schedule.key_block[t]
        mask = _block_mask(masks, b, i, j, block_size, sliding_window)
        q_i, do_i = _block(q32, b, i), _block(d_out, b, i)
        k_j, v_j = _block(k32, b, j), _block(v32, b, j)
        # Masked scores are _NEG_INF and lse is finite (0 for a query that saw no key), so
        # their probabilities come out 0 without a `where`.
        probs = jnp.exp(_scores(q_i, k_j, mask) - _block(lse, b, i)[..., None])
        dv = _add_block(dv, b, j, jnp.einsum("KGQS,KGQH->KSH", probs, do_i))
        d_probs = jnp.einsum("KGQH,KSH->KGQS", do_i, v_j)
        d_scores = probs * (d_probs - _block(delta, b, i)[..., None]) * scale
        dq = _add_block(dq, b, i, jnp.einsum("KGQS,KSH->KGQH", d_scores, k_j))
        dk = _add_block(dk, b, j, jnp.einsum("KGQS,KGQH->KSH", d_scores, q_i))
        return dq, dk, dv

    zeros = (jnp.zeros_like(q32), jnp.zeros_like(k32), jnp.zeros_like(v32))
    dq, dk, dv = jax.lax.fori_loop(0, schedule.count, visit, zeros)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _check_shapes(q, k, v, segment_ids, positions, prefix_segment_ids, block_size):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            "blocked_attention: expected q [B, L, N, H] and k, v [B, L, K, H], got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    B, L, N, H = q.shape
    if k.shape[:2] != (B, L) or k.shape[3] != H or N % k.shape[2]:
        raise ValueError(
            f"blocked_attention: k, v {k.shape} do not fit q {q.shape} (same B, L, H; "
            "q heads N a multiple of kv heads K)"
        )
    for name, x in (
        ("segment_ids", segment_ids),
        ("positions", positions),
        ("prefix_segment_ids", prefix_segment_ids),
    ):
        if x is not None and tuple(x.shape) != (B, L):
            raise ValueError(f"blocked_attention: {name} shape {x.shape}, expected {(B, L)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"blocked_attention: block_size must be a positive int, got {block_size}")


def _blocked_local(q, k, v, segment_ids, positions, prefix_segment_ids, sliding_window, block_size):
    """blocked_attention on whole arrays (one device's shard under a mesh)."""
    B, L, N, H = q.shape
    K = k.shape[2]
    bs = min(block_size, L)
    pad = -L % bs
    nb = (L + pad) // bs
    pad_tokens = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q, k, v = (pad_tokens(x) for x in (q, k, v))
    ints = [
        pad_tokens(jnp.asarray(x, jnp.int32)) for x in (segment_ids, positions, prefix_segment_ids)
    ]
    schedule = make_schedule(ints[0], ints[2], bs)
    masks = tuple(x.reshape(B, nb, bs) for x in ints)
    # Block-major layouts: a block is one contiguous slice of every loop-carried buffer.
    q = q.reshape(B, nb, bs, K, N // K, H).transpose(0, 1, 3, 4, 2, 5)
    k, v = (x.reshape(B, nb, bs, K, H).transpose(0, 1, 3, 2, 4) for x in (k, v))
    out = _attend(q, k, v, masks, schedule, sliding_window, bs)
    return out.transpose(0, 1, 4, 2, 3, 5).reshape(B, nb * bs, N, H)[:, :L]


def blocked_attention(
    q,
    k,
    v,
    segment_ids,
    positions,
    sliding_window=None,
    prefix_segment_ids=None,
    *,
    block_size=64,
):
    """Attention over the blocks the mask leaves visible; see the module docstring.

    block_size: tokens per query and per key block (a shorter sequence is one block).
    L is padded with segment-0 tokens up to a multiple of it; their outputs are cut.
    Smaller blocks skip more of the mask, larger ones cost less loop overhead per FLOP:
    64 measured fastest on CPU for packed rows of 768 (forward and backward ~1.4x faster
    than 128, which visits ~1.4x the blocks; 32 is slower again).

    Under a mesh (`jax.set_mesh`, as the train steps run) each device runs it on its own
    rows and heads in a shard_map, batch split as the "act_batch" rule says and heads as
    "act_heads" (whole GQA groups per shard), length whole: the loops index rows and blocks
    at run time, which GSPMD could only serve by gathering every row onto every device."""
    _check_shapes(q, k, v, segment_ids, positions, prefix_segment_ids, block_size)
    if prefix_segment_ids is None:
        prefix_segment_ids = jnp.zeros_like(segment_ids)
    local = functools.partial(_blocked_local, sliding_window=sliding_window, block_size=block_size)
    args = (q, k, v, segment_ids, positions, prefix_segment_ids)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(*args)
    # The splash kernel's placement rule. Imported here: attention.py registers this kernel.
    from dpo_jax.models.attention import _mesh_axes

    B, _, N, _ = q.shape
    batch = _mesh_axes("act_batch", (B,), mesh)
    heads = _mesh_axes("act_heads", (N, k.shape[2]), mesh)
    tokens, rows = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        local,
        in_specs=(tokens, tokens, tokens, rows, rows, rows),
        out_specs=tokens,
        check_vma=False,
    )(*args)
