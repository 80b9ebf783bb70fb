"""`DecoderLM`: one pure-functional decoder covering Llama, Mistral, Qwen2, Gemma, GPT-2 and
GPT-NeoX through `ModelConfig`.

    logits = model.apply({"params": p}, tokens, positions=None, segment_ids=None)
    hidden, unembed = model.apply({"params": p}, tokens, ..., method="features")

tokens, positions, segment_ids: [B, L] int32; logits [B, L, V] in the compute dtype;
hidden [B, L, D]; unembed [D, V]. Tokens attend causally within equal non-zero segment
ids, so padding (segment 0) and packing (segments 1..S, positions restarting per segment)
give the same values as separate unpadded rows.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.layers import (
    Attention,
    Mlp,
    Norm,
    attention_mask,
    compute_dtype,
    param,
    rope_tables,
)

_ACT = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
    """Pre-norm transformer block; sequential or parallel (GPT-NeoX) residual. x: [B, L, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos, sin) -> jax.Array:
        cfg = self.config
        rope = None if cos is None else (cos, sin)
        attn = Attention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x), mask, rope)
        if cfg.parallel_residual:
            x = x + attn + Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        else:
            x = x + attn
            x = x + Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, _ACT)


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
        block = nn.remat(Block, prevent_cse=True) if cfg.remat else Block
        self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = param(self, "lm_head", (D, V), ("embed", "vocab"), init)

    def _defaults(self, tokens, positions, segment_ids):
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
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
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
    ) -> tuple[jax.Array, jax.Array]:
        """Final normed hidden states [B, L, D] and unembedding [D, V] (compute dtype)."""
        cfg = self.config
        dtype = compute_dtype(cfg)
        positions, segment_ids = self._defaults(tokens, positions, segment_ids)
        x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)
        if cfg.scale_embeddings:
            # Gemma scales in the compute dtype (sqrt(3072) rounds to 55.5 in bfloat16).
            x = x * jnp.asarray(cfg.hidden_size**0.5, dtype)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embedding, positions, axis=0).astype(dtype)
        x = nn.with_logical_constraint(x, _ACT)
        mask = attention_mask(positions, segment_ids, cfg.sliding_window)
        cos, sin = rope_tables(cfg, positions) if cfg.position == "rope" else (None, None)
        for layer in self.layers:
            x = layer(x, mask, cos, sin)
        hidden = self.final_norm(x)
        unembed = self.embedding.T if cfg.tie_embeddings else self.lm_head
        return hidden, unembed.astype(dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, V] in the compute dtype."""
        hidden, unembed = self.features(tokens, positions, segment_ids)
        logits = hidden @ unembed
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
