"""Presets: parameter counts against transformers (meta device, free) and FLOP estimates."""

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from dpo_jax.models import DecoderLM, ModelConfig, presets
from dpo_jax.models.hf_config import config_from_hf, config_to_hf

EXPECTED = {
    "gpt2",
    "gpt2-large",
    "pythia-2.8b",
    "llama-3.2-1b",
    "llama-3-8b",
    "qwen2.5-0.5b",
    "gemma-2b",
    "mistral-7b",
}


def test_names():
    assert set(presets.names()) == EXPECTED
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        presets.get("gpt5")
    assert presets.get("gpt2", dtype="bfloat16", remat=True).remat


def test_gpt2_published_size():
    assert presets.count_params(presets.get("gpt2")) == 124_439_808


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_count_params_matches_transformers(name):
    cfg = presets.get(name)
    hf = config_to_hf(cfg)
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert presets.count_params(cfg) == sum(p.numel() for p in model.parameters())
    # The HF config we write reads back as the same preset.
    assert config_from_hf(config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma"])
def test_flops_per_token_matches_xla_count(family):
    """6N + attention term vs 3x the forward FLOPs XLA counts (matmuls dominate; the rest,
    norms, softmax, rope, is what the estimate leaves out, a few percent at this size)."""
    cfg = ModelConfig.tiny(family, hidden_size=128, mlp_dim=512, vocab_size=512, head_dim=32)
    model, length = DecoderLM(cfg), 64
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    tokens = jax.ShapeDtypeStruct((2, length), jnp.int32)
    cost = jax.jit(model.apply).lower(params, tokens).cost_analysis()
    xla = 3 * cost["flops"] / (2 * length)
    ours = presets.flops_per_token(cfg, length)
    assert abs(ours - xla) / xla < 0.1, (ours, xla)


def test_flops_sliding_window_caps_attention_term():
    cfg = presets.get("mistral-7b")
    short, long_ = presets.flops_per_token(cfg, 4096), presets.flops_per_token(cfg, 32768)
    assert short == long_
    assert presets.flops_per_token(cfg, 2048) < short
