"""`DecoderLM`: one pure-functional decoder covering Llama, Mistral, Qwen2, Gemma, GPT-2 and
GPT-NeoX through `ModelConfig`.

    logits = model.apply({"params": p}, tokens, positions=None, segment_ids=None,
                         prefix_segment_ids=None)
    hidden, unembed = model.apply({"params": p}, tokens, ..., method="features")
    cache = init_cache(config, batch, max_len)              # KV-cache decoding
    logits, cache = model.apply({"params": p}, tokens, positions, cache, method="decode")

tokens, positions, segment_ids, prefix_segment_ids: [B, L] int32; logits [B, L, V] in the
compute dtype; hidden [B, L, D]; unembed [D, V]. Tokens attend causally within equal
non-zero segment ids, so padding (segment 0) and packing (segments 1..S, positions
restarting per segment) give the same values as separate unpadded rows. A token whose
prefix_segment_ids entry is s != 0 also reads the earlier tokens of segment s (prompt
sharing: both responses of a pair read one copy of the prompt; the exact rule is in
`dpo_jax.models.attention`). Decoding takes no prefix: one sequence per row.

Layers run as a Python loop (params layers_0 .. layers_{n-1}) or, with
`config.scan_layers`, as one `nn.scan` (params `layers` with a leading [num_layers] axis;
`stack_layers` / `unstack_layers` convert): same values, depth-independent compile time.

Decoding keeps keys and values in an explicit `KVCache` (arrays in, arrays out; no mutable
collections): a prefill writes the prompt, then each call appends the next token(s). Every
call's logits equal the full forward over everything written so far (same masks, same
positions), for every family and feature, including the sliding window.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models.attention import Segments, decode_mask
from dpo_jax.models.config import ModelConfig, remat_policy
from dpo_jax.models.layers import Attention, Mlp, Norm, compute_dtype, param, rope_tables

_ACT = ("act_batch", "act_length", "act_embed")
_LOGITS = ("act_batch", "act_length", "act_vocab")


class KVCache(NamedTuple):
    """Keys and values of everything decoded so far, in S slots per row.

    k, v: one [B, S, K, H] array per layer (compute dtype, keys already rotated).
    positions: [B, S] int32 position of the token in each slot (for rope-free masks and the
      sliding window). segment_ids: [B, S] int32, 0 for empty slots and left padding.
    index: [] int32, the next slot to write; the same for every row, so a batch of prompts
      of different lengths is left-padded (padding with segment 0) to one slot count.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        """S, the number of slots."""
        return self.positions.shape[-1]


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of `max_length` slots (S) for `batch` rows (B); dtype defaults to the
    compute dtype. Size it for everything that will be decoded: the write index is traced,
    so writing past slot S-1 cannot be caught (XLA clamps the slot, corrupting the cache)."""
    dtype = compute_dtype(config) if dtype is None else jnp.dtype(dtype)
    shape = (batch, max_length, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    empty = jnp.zeros((batch, max_length), jnp.int32)
    return KVCache(zeros, zeros, empty, empty, jnp.zeros((), jnp.int32))


class Block(nn.Module):
    """Pre-norm transformer block; sequential or parallel (GPT-NeoX) residual. x: [B, L, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos, sin, kv=None, index=None):
        """Returns (x, updated (k, v) cache arrays or None); kv: this layer's (k, v) cache
        arrays and index the slot to write, as `Attention`'s cache (None: no cache). The
        cache is split from its index so that a layer scan slices the arrays per layer and
        broadcasts the index."""
        cfg = self.config
        rope = None if cos is None else (cos, sin)
        cache = None if kv is None else (*kv, index)
        attn, cache = Attention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x), mask, rope, cache)
        if cfg.parallel_residual:
            x = x + attn + Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        else:
            x = x + attn
            x = x + Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, _ACT), cache


def remat_block(config: ModelConfig):
    """`Block`, rematerialised as `config.remat` says (see config.REMAT_POLICIES)."""
    if config.remat == "none":
        return Block
    policy = remat_policy(config.remat)
    # Inside a scan the loop boundary already keeps XLA from merging the recomputation
    # into the forward pass; prevent_cse would only block optimisations there.
    return nn.remat(Block, prevent_cse=not config.scan_layers, policy=policy)


def scanned_blocks(config: ModelConfig, name: str = "layers"):
    """All blocks as one `nn.scan` over a stacked copy: params [num_layers, ...] with the
    logical axis "layers" in front; per-layer kv caches are scanned, everything else is
    shared. One block is traced and compiled instead of num_layers."""
    scan = nn.scan(
        remat_block(config),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=config.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scan(config, name=name)


def _is_layer(key: str) -> bool:
    return key.startswith("layers_") and key[len("layers_") :].isdigit()


def stack_layers(params: dict, num_layers: int) -> dict:
    """Loop layout (layers_0 .. layers_{n-1}) -> scan layout (layers: [n, ...] leaves).

    Works on host numpy (kept numpy) and on jax arrays; other entries pass through."""
    missing = [f"layers_{i}" for i in range(num_layers) if f"layers_{i}" not in params]
    if missing or "layers" in params:
        raise ValueError(f"stack_layers: not a {num_layers}-layer loop layout (missing {missing})")
    blocks = [params[f"layers_{i}"] for i in range(num_layers)]

    def stack(*xs):
        return np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)

    out = {k: v for k, v in params.items() if not _is_layer(k)}
    out["layers"] = jax.tree.map(stack, *blocks)
    return out


def unstack_layers(params: dict) -> dict:
    """Scan layout -> loop layout; the inverse of `stack_layers`."""
    if "layers" not in params:
        raise ValueError("unstack_layers: no stacked 'layers' entry (not a scan layout)")
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


class DecoderLM(nn.Module):
    """Decoder-only LM. Params are float32; compute runs in `config.dtype`."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embedding = param(self, "embedding", (V, D), ("vocab", "embed"), init)
        if cfg.position == "learned":
            self.pos_embedding = param(
                self, "pos_embedding", (cfg.max_position_embeddings, D), (None, "embed"), init
            )
        if cfg.scan_layers:
            self.layers = scanned_blocks(cfg)
        else:
            block = remat_block(cfg)
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = param(self, "lm_head", (D, V), ("embed", "vocab"), init)

    def _defaults(self, tokens, positions, segment_ids, prefix_segment_ids=None):
        if tokens.ndim != 2:
            raise ValueError(f"DecoderLM: tokens must be [B, L], got shape {tokens.shape}")
        B, L = tokens.shape
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"DecoderLM: tokens must be integers, got dtype {tokens.dtype}")
        if self.config.position == "learned" and L > self.config.max_position_embeddings:
            # An out-of-range position would gather NaN embeddings without any error.
            raise ValueError(
                f"DecoderLM: length {L} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings} of the learned position table"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32)
        arrays = [("positions", positions), ("segment_ids", segment_ids)]
        if prefix_segment_ids is not None:
            arrays.append(("prefix_segment_ids", prefix_segment_ids))
        for name, arr in arrays:
            if arr.shape != tokens.shape:
                raise ValueError(
                    f"DecoderLM: {name} shape {arr.shape} != tokens shape {tokens.shape}"
                )
        return positions, segment_ids

    def features(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prefix_segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Final normed hidden states [B, L, D] and unembedding [D, V] (compute dtype)."""
        cfg = self.config
        positions, segment_ids = self._defaults(tokens, positions, segment_ids, prefix_segment_ids)
        x, cos, sin = self._embed(tokens, positions)
        # Masked inside each layer's attention kernel.
        mask = Segments(segment_ids, positions, prefix_segment_ids)
        if cfg.scan_layers:
            x, _ = self.layers(x, mask, cos, sin, None, None)
        else:
            for layer in self.layers:
                x, _ = layer(x, mask, cos, sin)
        return self.final_norm(x), self._unembed()

    def _embed(self, tokens, positions):
        """Input embeddings x [B, L, D] and rope tables (cos, sin) or (None, None)."""
        cfg = self.config
        dtype = compute_dtype(cfg)
        x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)
        if cfg.scale_embeddings:
            # Gemma scales in the compute dtype (sqrt(3072) rounds to 55.5 in bfloat16).
            x = x * jnp.asarray(cfg.hidden_size**0.5, dtype)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embedding, positions, axis=0).astype(dtype)
        x = nn.with_logical_constraint(x, _ACT)
        cos, sin = rope_tables(cfg, positions) if cfg.position == "rope" else (None, None)
        return x, cos, sin

    def _unembed(self):
        unembed = self.embedding.T if self.config.tie_embeddings else self.lm_head
        return unembed.astype(compute_dtype(self.config))

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        segment_ids: jax.Array | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Appends L tokens to the cache and returns their logits and the updated cache.

        tokens, positions: [B, L] int32; the tokens go to slots cache.index .. index+L-1.
        segment_ids: [B, L] int32, default all ones; 0 marks left padding, which is never
          attended to. Decoding holds one sequence per row: use segment 1 for real tokens.
        last_only: return logits of the last column only ([B, 1, V]), e.g. for a prefill
          whose rows are left-padded so that every row ends in the last column.
        Returns logits [B, L, V] (compute dtype) equal to those of `__call__` on the whole
        sequence written so far, and the cache with index advanced by L.
        """
        cfg = self.config
        positions, segment_ids = self._defaults(tokens, positions, segment_ids)
        length, slots = tokens.shape[1], cache.max_length
        if length > slots:
            raise ValueError(f"DecoderLM.decode: {length} tokens exceed the cache's {slots} slots")
        if len(cache.k) != cfg.num_layers or cache.positions.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"DecoderLM.decode: cache of {len(cache.k)} layers x {cache.positions.shape[0]} "
                f"rows does not fit {cfg.num_layers} layers x {tokens.shape[0]} rows"
            )
        index = cache.index
        cache_positions = jax.lax.dynamic_update_slice_in_dim(
            cache.positions, positions.astype(jnp.int32), index, 1
        )
        cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(
            cache.segment_ids, segment_ids.astype(jnp.int32), index, 1
        )
        x, cos, sin = self._embed(tokens, positions)
        mask = decode_mask(
            positions, segment_ids, cache_positions, cache_segment_ids, index, cfg.sliding_window
        )
        if cfg.scan_layers:
            # The cache keeps one array per layer (the sampler's layout); the scan takes
            # them stacked, at the cost of one copy of the cache per call.
            x, (ks, vs) = self.layers(x, mask, cos, sin, (jnp.stack(cache.k), jnp.stack(cache.v)),
                                      index)  # fmt: skip
            ks, vs = tuple(ks), tuple(vs)
        else:
            ks, vs = [], []
            for layer, k, v in zip(self.layers, cache.k, cache.v, strict=True):
                x, (k, v) = layer(x, mask, cos, sin, (k, v), index)
                ks.append(k)
                vs.append(v)
        if last_only:
            x = x[:, -1:]
        logits = self.final_norm(x) @ self._unembed()
        cache = KVCache(tuple(ks), tuple(vs), cache_positions, cache_segment_ids, index + length)
        return nn.with_logical_constraint(logits, _LOGITS), cache

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prefix_segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, V] in the compute dtype."""
        hidden, unembed = self.features(tokens, positions, segment_ids, prefix_segment_ids)
        logits = hidden @ unembed
        return nn.with_logical_constraint(logits, _LOGITS)
