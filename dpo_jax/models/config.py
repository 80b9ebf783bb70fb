"""`ModelConfig`: one frozen dataclass describing every supported decoder family.

Families differ only in a handful of switches (norm type, MLP type, position encoding,
biases, residual layout), so one `DecoderLM` reads them from here instead of having one
module per family. Axis letters: D model width, N heads, K kv heads, H head dim,
F mlp width, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ROPE_TYPES = ("default", "llama3")
DTYPES = ("float32", "bfloat16")
# What a rematerialised block keeps for the backward pass: nothing but its input ("full"),
# or also the results of its matmuls (jax.checkpoint_policies of the same name; the
# no-batch-dims one keeps the projections, not the attention score/value einsums), or
# those same projections moved to host memory ("offload_dots_with_no_batch_dims": freed
# from HBM between the forward and the backward pass, copied back when needed; on a
# backend without host memory spaces XLA keeps them in device memory).
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "offload_dots_with_no_batch_dims",
)
# Self-attention kernel (dpo_jax.models.attention): the [L, L] einsum, jax.nn's
# dot_product_attention, the Pallas TPU splash kernel, or blocks skipping what the segments
# mask. Same math, same values.
ATTENTION_IMPLS = ("xla", "dot_product", "splash", "blocked")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only LM.

    Attributes:
      family: checkpoint family ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox");
        decides the Hugging Face weight layout, not the math (the switches below do that).
      vocab_size: V. hidden_size: D. num_layers: number of blocks.
      num_heads: N query heads. num_kv_heads: K key/value heads (GQA when K < N).
      head_dim: H (Gemma has H != D / N). mlp_dim: F.
      activation: "silu", "gelu" (erf), "gelu_tanh" (GPT-2 gelu_new / Gemma), "relu".
      gated_mlp: down(act(gate(x)) * up(x)) (Llama family) vs down(act(up(x))) (GPT-2/NeoX).
      norm: "rms" or "layer". norm_eps: epsilon inside the norm.
      norm_plus_one: RMSNorm scales by (1 + w) (Gemma) instead of w.
      position: "rope" or "learned" (GPT-2 table of max_position_embeddings rows).
      rope_theta: rope base. rotary_fraction: fraction of H that is rotated (Pythia 0.25).
      rope_type: "default" or "llama3" (Llama 3.1 frequency scaling with rope_factor,
        rope_low_freq_factor, rope_high_freq_factor, rope_original_max_positions).
      qkv_bias / out_bias / mlp_bias: biases on q,k,v / attention output / MLP projections.
      tie_embeddings: unembedding is the transposed token embedding.
      scale_embeddings: multiply embeddings by sqrt(D) in the compute dtype (Gemma).
      parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX) instead of sequential.
      sliding_window: attend only to keys with query_pos - key_pos < sliding_window (Mistral).
      dtype: compute dtype ("float32" or "bfloat16"); params always stay float32.
      remat: rematerialisation of each block in the backward pass, one of REMAT_POLICIES
        ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
        "offload_dots_with_no_batch_dims"); True and False (the older boolean form) mean
        "full" and "none". `remat_policy(name)` gives the jax checkpoint policy.
      scan_layers: run the blocks as one `nn.scan` over stacked params (a leading
        [num_layers] axis, logical name "layers"): compile time independent of depth.
        Params then have another layout (`decoder.stack_layers` / `unstack_layers`).
      attention: self-attention kernel of the full forward, one of ATTENTION_IMPLS: "xla"
        (einsum over [L, L] scores), "dot_product" (jax.nn.dot_product_attention),
        "splash" (Pallas TPU splash attention, blockwise; no sliding_window; lengths padded
        to a multiple of 128 for it) or "blocked" (pure JAX, 64-token blocks, only those the
        segments leave visible: packed rows on CPU). KV-cache decoding always uses the einsum.
      initializer_range: std of the normal init of kernels and embeddings.
      extra: hashable tuple of (key, value) pairs copied verbatim into exported configs
        (bos/eos token ids and the like); never affects the math.
    """

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 128
    activation: str = "silu"
    gated_mlp: bool = True
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False
    position: str = "rope"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    scale_embeddings: bool = False
    parallel_residual: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "xla"
    initializer_range: float = 0.02
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        if isinstance(self.remat, bool | np.bool_):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        check(self.family in FAMILIES, f"family={self.family!r} not in {FAMILIES}")
        check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} not in {REMAT_POLICIES}")
        check(
            self.activation in ACTIVATIONS, f"activation={self.activation!r} not in {ACTIVATIONS}"
        )
        check(self.norm in ("rms", "layer"), f"norm={self.norm!r} not in ('rms', 'layer')")
        check(self.position in ("rope", "learned"), f"position={self.position!r} invalid")
        check(self.rope_type in ROPE_TYPES, f"rope_type={self.rope_type!r} not in {ROPE_TYPES}")
        check(self.dtype in DTYPES, f"dtype={self.dtype!r} not in {DTYPES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.head_dim > 0 and self.mlp_dim > 0, "head_dim and mlp_dim must be positive")
        check(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads={self.num_heads} not divisible by num_kv_heads={self.num_kv_heads}",
        )
        check(0.0 < self.rotary_fraction <= 1.0, f"rotary_fraction={self.rotary_fraction}")
        check(self.rotary_dim % 2 == 0, f"rotary dim {self.rotary_dim} must be even")
        check(
            self.sliding_window is None or self.sliding_window > 0,
            f"sliding_window={self.sliding_window} must be positive or None",
        )
        check(
            self.attention in ATTENTION_IMPLS,
            f"attention={self.attention!r} not in {ATTENTION_IMPLS}",
        )
        # The splash kernel masks by index, the window is by position (they differ when
        # positions skip, e.g. a shared prompt): refuse rather than compute something else.
        check(
            not (self.attention == "splash" and self.sliding_window is not None),
            f"attention='splash' cannot apply sliding_window={self.sliding_window} (a "
            "window over positions); use attention='dot_product' or 'xla'",
        )

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that rope rotates (HF: int(H * partial_rotary_factor))."""
        return int(self.head_dim * self.rotary_fraction)

    def replace(self, **overrides) -> ModelConfig:
        return dataclasses.replace(self, **overrides)

    @classmethod
    def tiny(cls, family: str = "llama", **overrides) -> ModelConfig:
        """A tiny config of `family` (2 layers, D=64, V=256) for tests of other modules."""
        base = dict(
            family=family,
            vocab_size=256,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            head_dim=16,
            mlp_dim=128,
            max_position_embeddings=128,
        )
        per_family = {
            "llama": dict(num_kv_heads=2, norm_eps=1e-5),
            "mistral": dict(num_kv_heads=2, norm_eps=1e-5, sliding_window=8),
            "qwen2": dict(num_kv_heads=2, qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
            "gemma": dict(
                num_kv_heads=1,
                head_dim=32,
                activation="gelu_tanh",
                norm_plus_one=True,
                tie_embeddings=True,
                scale_embeddings=True,
            ),
            "gpt2": dict(
                num_kv_heads=4,
                mlp_dim=256,
                activation="gelu_tanh",
                gated_mlp=False,
                norm="layer",
                norm_eps=1e-5,
                position="learned",
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                tie_embeddings=True,
            ),
            "gpt_neox": dict(
                num_kv_heads=4,
                mlp_dim=256,
                activation="gelu",
                gated_mlp=False,
                norm="layer",
                norm_eps=1e-5,
                rotary_fraction=0.25,
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                parallel_residual=True,
            ),
        }
        if family not in per_family:
            raise ValueError(f"ModelConfig.tiny: family={family!r} not in {FAMILIES}")
        return cls(**{**base, **per_family[family], **overrides})


@functools.cache
def remat_policy(name: str):
    """The `jax.checkpoint` policy of remat policy `name` (None for "full": save nothing
    but the block's input). One object per name, so a traced program names it once."""
    if name not in REMAT_POLICIES[1:]:
        raise ValueError(f"remat_policy: {name!r} not in {REMAT_POLICIES[1:]}")
    if name == "full":
        return None
    if name == "offload_dots_with_no_batch_dims":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return getattr(jax.checkpoint_policies, name)
