"""Hugging Face config.json <-> `ModelConfig`.

Reads both transformers 5 configs (rope settings in `rope_parameters`) and older ones
(`rope_theta`, `rope_scaling`, `rotary_pct`, `rotary_emb_base`). Missing keys take the
defaults of the transformers 5.24 config classes.
"""

from __future__ import annotations

from typing import Any

from dpo_jax.models.config import ModelConfig


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint (config.json or safetensors) that we cannot load faithfully."""


_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
}
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
_ACTIVATIONS_TO_HF = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
}
_EXTRA_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


def _activation(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise HFCheckpointError(
            f"{where}: activation {name!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[name]


def _rope(hf: dict[str, Any], where: str, default_fraction: float) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise HFCheckpointError(f"{where}: per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get(
        "partial_rotary_factor",
        hf.get("partial_rotary_factor", hf.get("rotary_pct", default_fraction)),
    )
    out = dict(rope_theta=float(theta), rotary_fraction=float(fraction), rope_type=rope_type)
    if rope_type == "llama3":
        out.update(
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_positions=int(
                params.get(
                    "original_max_position_embeddings",
                    hf.get("original_max_position_embeddings", hf["max_position_embeddings"]),
                )
            ),
        )
    elif rope_type != "default":
        raise HFCheckpointError(
            f"{where}: rope_type {rope_type!r} is not supported (supported: default, llama3)"
        )
    return out


def config_from_hf(hf: dict[str, Any], where: str = "config.json", **overrides) -> ModelConfig:
    """`ModelConfig` from a parsed Hugging Face config.json dict; `overrides` win."""
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise HFCheckpointError(
            f"{where}: model_type {model_type!r} is not supported (supported: {_MODEL_TYPES})"
        )
    extra = tuple((k, _freeze(hf[k])) for k in _EXTRA_KEYS if hf.get(k) is not None)
    common = dict(family=model_type, vocab_size=hf["vocab_size"], extra=extra)
    if model_type == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise HFCheckpointError(
                f"{where}: non-default GPT-2 attention scaling is not supported"
            )
        D = hf["n_embd"]
        fields = dict(
            hidden_size=D,
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            num_kv_heads=hf["n_head"],
            head_dim=D // hf["n_head"],
            mlp_dim=hf.get("n_inner") or 4 * D,
            activation=_activation(hf.get("activation_function", "gelu_new"), where),
            gated_mlp=False,
            norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position="learned",
            max_position_embeddings=hf["n_positions"],
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    elif model_type == "gpt_neox":
        D, N = hf["hidden_size"], hf["num_attention_heads"]
        bias = hf.get("attention_bias", True)
        fields = dict(
            hidden_size=D,
            num_layers=hf["num_hidden_layers"],
            num_heads=N,
            num_kv_heads=N,
            head_dim=D // N,
            mlp_dim=hf["intermediate_size"],
            activation=_activation(hf.get("hidden_act", "gelu"), where),
            gated_mlp=False,
            norm="layer",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            qkv_bias=bias,
            out_bias=bias,
            mlp_bias=True,
            parallel_residual=hf.get("use_parallel_residual", True),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            **_rope(hf, where, default_fraction=0.25),
        )
    else:
        D, N = hf["hidden_size"], hf["num_attention_heads"]
        act = hf.get("hidden_act", "gelu_pytorch_tanh" if model_type == "gemma" else "silu")
        if model_type == "gemma" and act == "gelu":
            act = "gelu_pytorch_tanh"  # transformers does the same: legacy Gemma configs
        attention_bias = hf.get("attention_bias", False)
        sliding_window = None
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window")
        if model_type == "qwen2" and hf.get("use_sliding_window", False):
            raise HFCheckpointError(f"{where}: Qwen2 use_sliding_window=true is not supported")
        fields = dict(
            hidden_size=D,
            num_layers=hf["num_hidden_layers"],
            num_heads=N,
            num_kv_heads=hf.get("num_key_value_heads") or N,
            head_dim=hf.get("head_dim") or D // N,
            mlp_dim=hf["intermediate_size"],
            activation=_activation(act, where),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "gemma") and attention_bias),
            out_bias=model_type in ("llama", "gemma") and attention_bias,
            mlp_bias=model_type == "llama" and hf.get("mlp_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", model_type == "gemma"),
            norm_plus_one=model_type == "gemma",
            scale_embeddings=model_type == "gemma",
            sliding_window=sliding_window,
            **_rope(hf, where, default_fraction=1.0),
        )
    try:
        return ModelConfig(**{**common, **fields, **overrides})
    except ValueError as e:
        raise HFCheckpointError(f"{where}: {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers 5 config.json dict for `cfg` (float32 weights)."""
    fam = cfg.family
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[fam]],
        "model_type": fam,
        "dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
    }
    act = _ACTIVATIONS_TO_HF[cfg.activation]
    if fam == "gpt2":
        hf.update(
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim,
            n_positions=cfg.max_position_embeddings,
            activation_function="gelu_new" if cfg.activation == "gelu_tanh" else act,
            layer_norm_epsilon=cfg.norm_eps,
        )
    else:
        rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
        if cfg.rotary_fraction != 1.0 or fam == "gpt_neox":
            rope["partial_rotary_factor"] = cfg.rotary_fraction
        if cfg.rope_type == "llama3":
            rope.update(
                factor=cfg.rope_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_positions,
            )
        hf.update(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.mlp_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            hidden_act=act,
            rope_parameters=rope,
        )
        if fam == "gpt_neox":
            hf.update(
                layer_norm_eps=cfg.norm_eps,
                use_parallel_residual=cfg.parallel_residual,
                attention_bias=cfg.qkv_bias,
            )
        else:
            hf.update(
                num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                rms_norm_eps=cfg.norm_eps,
            )
        if fam in ("llama", "gemma"):
            hf["attention_bias"] = cfg.qkv_bias
        if fam == "llama":
            hf["mlp_bias"] = cfg.mlp_bias
        if fam == "mistral":
            hf["sliding_window"] = cfg.sliding_window
        if fam == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None)
    for key, value in cfg.extra:
        hf[key] = list(value) if isinstance(value, tuple) else value
    return hf


def check_exportable(cfg: ModelConfig) -> None:
    """Raise HFCheckpointError when `cfg` has switches its family's HF class cannot express."""
    fam = cfg.family
    expected: dict[str, Any] = {}
    if fam in ("llama", "mistral", "qwen2", "gemma"):
        expected.update(
            norm="rms",
            gated_mlp=True,
            position="rope",
            parallel_residual=False,
            norm_plus_one=fam == "gemma",
            scale_embeddings=fam == "gemma",
        )
        if fam != "mistral":
            expected["sliding_window"] = None
        if fam == "mistral":
            expected.update(qkv_bias=False, out_bias=False, mlp_bias=False)
        if fam == "qwen2":
            expected.update(qkv_bias=True, out_bias=False, mlp_bias=False)
        if fam == "gemma":
            expected.update(out_bias=cfg.qkv_bias, mlp_bias=False)
        if fam == "llama":
            expected.update(out_bias=cfg.qkv_bias)
    elif fam == "gpt2":
        expected.update(
            norm="layer",
            gated_mlp=False,
            position="learned",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            parallel_residual=False,
            num_kv_heads=cfg.num_heads,
            head_dim=cfg.hidden_size // cfg.num_heads,
            sliding_window=None,
        )
    else:
        expected.update(
            norm="layer",
            gated_mlp=False,
            position="rope",
            out_bias=cfg.qkv_bias,
            mlp_bias=True,
            num_kv_heads=cfg.num_heads,
            head_dim=cfg.hidden_size // cfg.num_heads,
            sliding_window=None,
        )
    bad = {k: (getattr(cfg, k), v) for k, v in expected.items() if getattr(cfg, k) != v}
    if bad:
        details = ", ".join(f"{k}={got!r} (needs {want!r})" for k, (got, want) in bad.items())
        raise HFCheckpointError(f"cannot export a {fam} config to Hugging Face: {details}")
