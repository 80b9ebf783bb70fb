"""Building blocks of `DecoderLM`: norms, rotary embeddings, attention, MLP.

Axis letters: B batch, L length, D model width, N heads, K kv heads, G = N / K query heads
per kv head, H head dim, F mlp width. Params are float32 and cast to the compute dtype at
use; norms and the attention softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import attention
from dpo_jax.models.config import ModelConfig


def compute_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


def param(module: nn.Module, name: str, shape, axes, init):
    """A float32 param with logical axis names `axes` (one per dim of `shape`)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def linear(x: jax.Array, w: jax.Array, in_dims: int) -> jax.Array:
    """x [B, L, *in] @ w [*in, *out] -> [B, L, *out], as one 2-D matmul [B*L, in] x [in, out].

    The same products as `jnp.einsum` over the named dims; why flatten: the weight
    gradient contracts over every token, and with tokens on two dims (B, L) XLA:CPU's layout
    assignment materialises a transposed copy of the activation gradient for it (a slow
    strided loop, fused with the elementwise backward before it). With the tokens on one
    major dim the dot reads both operands as they lie: the MLP's forward + backward on
    [4, 768] tokens runs 1.7x faster on CPU (issue 12's workload). The reshapes merge or
    split major dims only, so they are free and keep the batch dim's sharding.
    """
    lead = x.shape[: x.ndim - in_dims]
    k = math.prod(x.shape[x.ndim - in_dims :])
    out = w.shape[in_dims:]
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *out)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


class Norm(nn.Module):
    """RMSNorm (optionally scaled by 1 + w, Gemma) or LayerNorm, computed in float32.

    x: [..., D] -> [..., D] in the compute dtype.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        if cfg.norm == "rms":
            init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
            scale = param(self, "scale", (d,), ("norm",), init)
            y = x32 * jax.lax.rsqrt(
                jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps
            )
            y = y * (1.0 + scale if cfg.norm_plus_one else scale)
        else:
            scale = param(self, "scale", (d,), ("norm",), nn.initializers.ones)
            bias = param(self, "bias", (d,), ("norm",), nn.initializers.zeros)
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale + bias
        return y.astype(compute_dtype(cfg))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] float32, as Hugging Face's rope init computes them.

    Default: theta ** -(2i / d). "llama3" (Llama 3.1): long wavelengths divided by `factor`,
    short ones kept, the band between interpolated smoothly.
    """
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_positions
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, L, rotary_dim] in the compute dtype for positions [B, L]."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    dtype = compute_dtype(config)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first rotary_dim dims of x [B, L, N, H] (rotate-half layout, as HF)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, x_pass], axis=-1)


# Cache k/v [B, S, K, H]: batch over the data axes like every activation; the kv-head dim is
# left to XLA so that it follows the k/v kernels (whose "kv_heads" may be tensor-sharded, or
# left whole when K does not divide the tensor axis).
CACHE_AXES = ("act_batch", "act_length", jax.sharding.PartitionSpec.UNCONSTRAINED, None)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with rope (optional) and segment masking.

    x: [B, L, D], rope: (cos, sin) [B, L, rotary_dim] or None.
    cache: None (keys and values are x's own), or (k, v, index) when decoding: k, v
      [B, S, K, H] cache arrays and the slot `index` [] int32 where x's keys and values are
      written.
    mask: without a cache, `attention.Segments` (segment_ids, positions [B, L], optional
      prefix_segment_ids [B, L]), attended by the kernel `config.attention` names; with
      one, the boolean [B, 1, 1, L, S] mask over the updated cache (`attention.decode_mask`).
    Returns (y [B, L, D], (k, v) updated cache arrays, or None without a cache).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, rope, cache=None):
        cfg = self.config
        dtype = compute_dtype(cfg)
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(cfg.initializer_range)
        zeros = nn.initializers.zeros

        def project(name, heads, head_axis):
            w = param(self, f"{name}_kernel", (D, heads, H), ("embed", head_axis, "head_dim"), init)
            y = linear(x, w.astype(dtype), 1)  # [B, L, heads, H]
            if cfg.qkv_bias:
                b = param(self, f"{name}_bias", (heads, H), (head_axis, "head_dim"), zeros)
                y = y + b.astype(dtype)
            return y

        q = project("q", N, "heads")
        k = project("k", K, "kv_heads")
        v = project("v", K, "kv_heads")
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        new_cache = None
        if cache is not None:
            k_cache, v_cache, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, 1)
            k = nn.with_logical_constraint(k, CACHE_AXES)
            v = nn.with_logical_constraint(v, CACHE_AXES)
            new_cache = (k, v)
            k, v = k.astype(dtype), v.astype(dtype)

        if cache is None:
            # `init` only creates params and drops its output: the einsum takes its dummy
            # batch of any length (a fused kernel may not, e.g. splash's 128-token blocks).
            name = "xla" if self.is_initializing() else cfg.attention
            implementation = attention.IMPLEMENTATIONS[name]
            segment_ids, positions, prefix_segment_ids = mask
            # The prefix goes by keyword, and only when set: an implementation without
            # prompt sharing keeps the plain (q, k, v, segment_ids, positions) signature.
            extra = {} if prefix_segment_ids is None else {"prefix_segment_ids": prefix_segment_ids}
            out = implementation(
                q, k, v, segment_ids, positions, sliding_window=cfg.sliding_window, **extra
            )
        else:
            # Decoding attends L new queries to S cache slots (not a square causal
            # problem the fused kernels take), so it keeps the einsum whatever
            # config.attention says; its logits equal the full forward's either way.
            out = attention.masked_attention(q, k, v, mask)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))

        wo = param(self, "o_kernel", (N, H, D), ("heads", "head_dim", "embed"), init)
        y = linear(out, wo.astype(dtype), 2)  # [B, L, N, H] x [N, H, D]
        if cfg.out_bias:
            y = y + param(self, "o_bias", (D,), ("embed",), zeros).astype(dtype)
        return y, new_cache


class Mlp(nn.Module):
    """Gated (down(act(gate x) * up x)) or plain (down(act(up x))) MLP. x: [B, L, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = compute_dtype(cfg)
        D, F = cfg.hidden_size, cfg.mlp_dim
        init = nn.initializers.normal(cfg.initializer_range)
        zeros = nn.initializers.zeros

        def dense(name, shape, axes, y):
            w = param(self, f"{name}_kernel", shape, axes, init)
            y = linear(y, w.astype(dtype), 1)
            if cfg.mlp_bias:
                y = y + param(self, f"{name}_bias", shape[-1:], axes[-1:], zeros).astype(dtype)
            return y

        first = "gate" if cfg.gated_mlp else "up"
        h = activation(cfg.activation, dense(first, (D, F), ("embed", "mlp"), x))
        if cfg.gated_mlp:
            h = h * dense("up", (D, F), ("embed", "mlp"), x)
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return dense("down", (F, D), ("mlp", "embed"), h)
