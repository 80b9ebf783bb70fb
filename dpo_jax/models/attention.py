"""Self-attention kernels behind `ModelConfig.attention`: one math, four implementations.

    out = IMPLEMENTATIONS[config.attention](
        q, k, v, segment_ids, positions, sliding_window=None, prefix_segment_ids=None)

q: [B, L, N, H]; k, v: [B, L, K, H] with N a multiple of K (grouped-query attention:
query head n reads kv head n // G, G = N / K); segment_ids, positions,
prefix_segment_ids: [B, L] int32 (prefix None = all zeros); out: [B, L, N, H] in q's
dtype. Every implementation computes softmax(q k^T / sqrt(H)) v with scores and softmax in
float32, under one mask rule: key k is visible to query q iff

    k <= q  and  seg[k] != 0  and  (seg[k] == seg[q]  or  (prefix[q] != 0 and seg[k] == prefix[q]))
            and  (window set)  pos[q] - pos[k] < sliding_window.

A token reads its own segment causally and the earlier tokens of the one "prefix" segment
it names: prompt sharing (`dpo_jax.data.batching`, layout "packed_shared") puts a pair's
prompt in one segment and each response in its own segment naming the prompt's.

- "xla": the einsum over materialised [B, K, G, L, L] scores (`masked_attention`); the
  default, and what KV-cache decoding always uses.
- "dot_product": `jax.nn.dot_product_attention` with implementation=None, JAX's own choice
  of kernel (in jax 0.10 still its XLA path on every backend; cuDNN flash attention needs
  implementation="cudnn", which only takes float16/bfloat16).
- "splash": the Pallas TPU splash-attention kernel (blockwise, never materialises [L, L]
  scores; segment ids are the kernel's own, GQA its grouped heads). It cannot express the
  position-based sliding window (`ModelConfig` refuses the pair) nor prefix segments
  (refused at trace time; `validate` refuses the config). It tiles L in blocks of
  128 or more (`SPLASH_BLOCKS`): other lengths are padded up to a multiple of 128 for the
  call (wasted work: prefer such lengths). On CPU it runs in Pallas interpret mode.
- "blocked": `blocked_attention.blocked_attention`, pure JAX: 64-token blocks, visiting
  only the key blocks the segments (and prefixes) leave visible, found per row at run
  time; online softmax and a flash-attention custom VJP. Cost follows the real segment
  lengths: the one to use for packed rows on CPU. Padding queries come out 0.

Padding (segment 0) differs only where nothing reads it: "xla" masks padding queries out
entirely, the fused kernels let padding attend to earlier padding (a kernel's softmax row
must never be empty). Real tokens never see padding in any of them, so their outputs, and
every gradient of a loss over real tokens, are the same.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dpo_jax.models.blocked_attention import blocked_attention

_NEG_INF = float(np.finfo(np.float32).min)

# Splash tiles the sequence in blocks of the largest of these that divides L.
SPLASH_BLOCKS = (512, 256, 128)


class Segments(NamedTuple):
    """What the full (cache-free) forward masks with: segment_ids, positions [B, L] int32
    and optional prefix_segment_ids [B, L] int32 (None: no token reads another segment)."""

    segment_ids: jax.Array
    positions: jax.Array
    prefix_segment_ids: jax.Array | None = None


def visible_segments(segment_ids: jax.Array, prefix_segment_ids: jax.Array | None) -> jax.Array:
    """Boolean [B, L, L] (query, key), the segment part of the mask rule (module docstring):
    seg[k] != 0 and (seg[k] == seg[q] or (prefix[q] != 0 and seg[k] == prefix[q]))."""
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = (key == query) & (key != 0)
    if prefix_segment_ids is not None:
        prefix = prefix_segment_ids[:, :, None]
        visible |= (prefix != 0) & (key == prefix)
    return visible


def attention_mask(
    positions: jax.Array,
    segment_ids: jax.Array,
    sliding_window: int | None,
    prefix_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B, 1, 1, L, L] (query, key) by the module docstring's rule: causal by
    index, a visible segment (its own, or the prefix segment it names), and query_pos -
    key_pos < sliding_window when a window is set (HF: kv > q - window)."""
    length = segment_ids.shape[-1]
    idx = jnp.arange(length)
    causal = idx[:, None] >= idx[None, :]
    mask = causal[None] & visible_segments(segment_ids, prefix_segment_ids)
    if sliding_window is not None:
        mask &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
    return mask[:, None, None]


def decode_mask(
    positions: jax.Array,
    segment_ids: jax.Array,
    cache_positions: jax.Array,
    cache_segment_ids: jax.Array,
    index: jax.Array,
    sliding_window: int | None,
) -> jax.Array:
    """Boolean mask [B, 1, 1, L, S] of L new tokens (written at cache slots index..index+L-1)
    against the S cache slots, which already hold them: causal by slot, same non-zero
    segment, and the sliding window by position, exactly as `attention_mask` would mask the
    whole sequence. positions, segment_ids: [B, L]; cache_positions, cache_segment_ids: [B, S].
    """
    query_slot = index + jnp.arange(positions.shape[-1])
    key_slot = jnp.arange(cache_positions.shape[-1])
    causal = key_slot[None, :] <= query_slot[:, None]
    same = (segment_ids[:, :, None] == cache_segment_ids[:, None, :]) & (
        segment_ids[:, :, None] != 0
    )
    mask = causal[None] & same
    if sliding_window is not None:
        mask &= (positions[:, :, None] - cache_positions[:, None, :]) < sliding_window
    return mask[:, None, None]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Einsum attention under an explicit mask. q: [B, L, N, H]; k, v: [B, S, K, H];
    mask: [B, 1, 1, L, S] bool. Returns [B, L, N, H] in q's dtype."""
    B, L, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, L, K, N // K, H)
    scores = jnp.einsum("BQKGH,BSKH->BKGQS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (H**-0.5)
    scores = jnp.where(mask, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("BKGQS,BSKH->BQKGH", probs, v).reshape(B, L, N, H)


def xla_attention(q, k, v, segment_ids, positions, sliding_window=None, prefix_segment_ids=None):
    """Materialised [L, L] scores; see the module docstring for shapes."""
    mask = attention_mask(positions, segment_ids, sliding_window, prefix_segment_ids)
    return masked_attention(q, k, v, mask)


def dot_product_attention(
    q, k, v, segment_ids, positions, sliding_window=None, prefix_segment_ids=None
):
    """`jax.nn.dot_product_attention`; see the module docstring for shapes.

    Segments and the window go in as a boolean mask [B, 1, L, L]; causality as is_causal
    (which a fused kernel can skip blocks for instead of reading it from the mask). Padding
    queries keep attending to earlier padding, so that no softmax row is empty."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix_segment_ids is not None:
        prefix = prefix_segment_ids[:, :, None]
        same |= (prefix != 0) & (segment_ids[:, None, :] == prefix)
    if sliding_window is not None:
        same &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
    return jax.nn.dot_product_attention(q, k, v, mask=same[:, None], is_causal=True)


def _splash_kernel(num_heads: int, length: int, interpret: bool):
    """A causal splash kernel for [num_heads, length, H] queries. Built at every trace (its
    mask tables become constants of that trace); the costly part, the numpy analysis of
    which mask blocks to visit, is cached by splash itself."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash_local(q, k, v, segment_ids):
    """Splash on one device's shard. q: [B, N, L, H] (already scaled); k, v: [B, K, L, H];
    segment_ids: [B, L]. The TPU branch is the Mosaic kernel; the CPU branch the same kernel
    interpreted. Which one runs is decided when lowering for a platform, so an AOT compile
    for a TPU topology on a CPU host gets the real kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    num_heads, length = q.shape[1], q.shape[2]

    def run(interpret, q, k, v, segment_ids):
        kernel = _splash_kernel(num_heads, length, interpret)
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s))  # noqa: E731
        return jax.vmap(one)(q, k, v, segment_ids)

    return jax.lax.platform_dependent(
        q,
        k,
        v,
        segment_ids,
        tpu=functools.partial(run, False),
        cpu=functools.partial(run, True),
    )


def _mesh_axes(logical: str, dims: tuple[int, ...], mesh) -> str | tuple[str, ...] | None:
    """Mesh axes of `logical` under the active logical-axis rules, or None when they do not
    divide every one of `dims` (then that dim stays whole on each device)."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    return axes if all(d % size == 0 for d in dims) else None


def splash_attention(q, k, v, segment_ids, positions, sliding_window=None, prefix_segment_ids=None):
    """The Pallas TPU splash kernel; see the module docstring for shapes.

    Under a mesh (`jax.set_mesh`, as the train steps run) the kernel runs per shard in a
    shard_map: batch split as the "act_batch" rule says, heads as "act_heads" (q and kv
    heads alike, so that each shard keeps whole GQA groups), length whole. A Pallas call
    has no partitioning rule, so GSPMD alone would gather every head onto every device."""
    del positions  # causal by index; the window, the only use of positions, is refused
    if sliding_window is not None:
        raise ValueError(
            "attention='splash' cannot express a sliding window (by position); "
            "use attention='dot_product' or 'xla'"
        )
    if prefix_segment_ids is not None:
        # Splash masks by equal segment ids only; a prefix segment is a second id per query.
        raise ValueError(
            "attention='splash' cannot express prompt sharing (prefix_segment_ids): set "
            "config.model.attention='xla' or 'dot_product', or config.data.layout to "
            "'padded' or 'packed'"
        )
    B, L, N, H = q.shape
    K = k.shape[2]
    pad = -L % SPLASH_BLOCKS[-1]
    if pad:
        # Appended tokens of segment 0: no real token attends to them; their outputs are cut.
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    # Splash does not scale scores; H**-0.5 is a power of two for H = 64, 128, 256.
    q = (q * jnp.asarray(H**-0.5, q.dtype)).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    segment_ids = segment_ids.astype(jnp.int32)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = _splash_local(q, k, v, segment_ids)
    else:
        batch = _mesh_axes("act_batch", (B,), mesh)
        heads = _mesh_axes("act_heads", (N, K), mesh)
        heads_spec = P(batch, heads, None, None)
        out = jax.shard_map(
            _splash_local,
            in_specs=(heads_spec, heads_spec, heads_spec, P(batch, None)),
            out_specs=heads_spec,
            check_vma=False,
        )(q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3)[:, :L]


# Keys are the names of config.ATTENTION_IMPLS.
IMPLEMENTATIONS = {
    "xla": xla_attention,
    "dot_product": dot_product_attention,
    "splash": splash_attention,
    "blocked": blocked_attention,
}
