"""Published architectures as `ModelConfig`s, parameter counts and FLOP estimates.

    presets.names() -> ["gemma-2b", "gpt2", ...]
    presets.get("llama-3.2-1b") -> ModelConfig
    count_params(config) -> int          # jax.eval_shape, allocates nothing
    flops_per_token(config, seq_len)     # training FLOPs (forward + backward) per token

Hyperparameters are those of the public Hugging Face config.json of each model
(openai-community/gpt2, gpt2-large, EleutherAI/pythia-2.8b, meta-llama/Llama-3.2-1B,
meta-llama/Meta-Llama-3-8B, Qwen/Qwen2.5-0.5B, google/gemma-2b, mistralai/Mistral-7B-v0.1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import DecoderLM

_GPT2 = dict(
    family="gpt2",
    vocab_size=50257,
    activation="gelu_tanh",
    gated_mlp=False,
    norm="layer",
    norm_eps=1e-5,
    position="learned",
    max_position_embeddings=1024,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
    extra=(("bos_token_id", 50256), ("eos_token_id", 50256)),
)

_PRESETS: dict[str, dict] = {
    "gpt2": dict(
        _GPT2,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        mlp_dim=3072,
    ),
    "gpt2-large": dict(
        _GPT2,
        hidden_size=1280,
        num_layers=36,
        num_heads=20,
        num_kv_heads=20,
        head_dim=64,
        mlp_dim=5120,
    ),
    "pythia-2.8b": dict(
        family="gpt_neox",
        vocab_size=50304,
        hidden_size=2560,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=80,
        mlp_dim=10240,
        activation="gelu",
        gated_mlp=False,
        norm="layer",
        norm_eps=1e-5,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rotary_fraction=0.25,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        parallel_residual=True,
        tie_embeddings=False,
        extra=(("bos_token_id", 0), ("eos_token_id", 0)),
    ),
    "llama-3.2-1b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_type="llama3",
        rope_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_positions=8192,
        tie_embeddings=True,
        extra=(("bos_token_id", 128000), ("eos_token_id", 128001)),
    ),
    "llama-3-8b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
        extra=(("bos_token_id", 128000), ("eos_token_id", 128001)),
    ),
    "qwen2.5-0.5b": dict(
        family="qwen2",
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=4864,
        norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_embeddings=True,
        extra=(("bos_token_id", 151643), ("eos_token_id", 151643)),
    ),
    "gemma-2b": dict(
        family="gemma",
        vocab_size=256000,
        hidden_size=2048,
        num_layers=18,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        mlp_dim=16384,
        activation="gelu_tanh",
        norm_eps=1e-6,
        norm_plus_one=True,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        tie_embeddings=True,
        scale_embeddings=True,
        extra=(("bos_token_id", 2), ("eos_token_id", 1), ("pad_token_id", 0)),
    ),
    "mistral-7b": dict(
        family="mistral",
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        norm_eps=1e-5,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_embeddings=False,
        extra=(("bos_token_id", 1), ("eos_token_id", 2)),
    ),
}


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The preset `name`; `overrides` replace fields (e.g. dtype="bfloat16", remat=True)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {names()}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


def param_shapes(config: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct of the params (boxed with logical axis names)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(DecoderLM(config).init, jax.random.key(0), tokens)["params"]


@functools.lru_cache(maxsize=64)
def count_params(config: ModelConfig) -> int:
    """Number of parameters (a tied embedding counted once), without allocating them."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(config))))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, PaLM-style (Chowdhery et al. 2022, app. B):

        6 * N_matmul + 12 * num_layers * num_heads * head_dim * T

    N_matmul = count_params minus the lookup-only tables (the token embedding when it is
    not tied to the unembedding, and learned position embeddings): every other parameter
    takes part in one multiply-add per token (2 FLOPs forward, 4 backward). The second term
    is QK^T and attention-times-V over T = min(seq_len, sliding_window) keys, without
    halving for the causal mask (as PaLM and most MFU reports do).
    """
    n = count_params(config)
    if not config.tie_embeddings:
        n -= config.vocab_size * config.hidden_size
    if config.position == "learned":
        n -= config.max_position_embeddings * config.hidden_size
    keys = seq_len if config.sliding_window is None else min(seq_len, config.sliding_window)
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * keys
    return float(6 * n + attention)
