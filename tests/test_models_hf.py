"""Parity of DecoderLM with Hugging Face transformers (PyTorch) on tiny random models.

Each case builds a tiny transformers model (float32, all weights perturbed so that norms
and biases are not at their trivial init), saves it with save_pretrained, loads it with
`from_hf`, and compares logits: plain, left/right padded, packed; then exports with `to_hf`.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from dpo_jax.models import DecoderLM, HFCheckpointError, ModelConfig, from_hf, to_hf

ATOL = 1e-4
L = 16
SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": lambda: transformers.LlamaConfig(
        **SMALL, intermediate_size=128, num_key_value_heads=2, attention_bias=True, mlp_bias=True
    ),
    "llama3_tied": lambda: transformers.LlamaConfig(
        **SMALL,
        intermediate_size=128,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE,
    ),
    "mistral_window": lambda: transformers.MistralConfig(
        **SMALL, intermediate_size=128, num_key_value_heads=2, sliding_window=5
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **SMALL, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "gemma": lambda: transformers.GemmaConfig(
        **SMALL, intermediate_size=128, num_key_value_heads=1, head_dim=32
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, intermediate_size=256),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        **SMALL, intermediate_size=256, use_parallel_residual=False, rotary_pct=0.5
    ),
}


def make_hf_model(hf_config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def random_params(model, seed):
    """Random float32 params with the shapes of model.init, without compiling an init
    (random-number kernels take seconds to compile on CPU). Norm scales near 1."""
    rng = np.random.default_rng(list(str(seed).encode()))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32)))

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def hf_logits(model, tokens, attention_mask=None, position_ids=None):
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(attention_mask)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(CASES[request.param]())
    hf_model.save_pretrained(path)
    model, params = from_hf(str(path))
    return dict(name=request.param, path=path, hf=hf_model, model=model, params=params)


def test_logits_padding_packing(case):
    """One batch of 4 rows: plain, left-padded, right-padded, two packed sequences + padding.

    HF gets the attention_mask and matching position_ids; only real positions are compared.
    """
    assert case["model"].config.family in case["name"]
    rng = np.random.default_rng(0)
    full, seq, a, b = (rng.integers(0, 256, n) for n in (L, 11, 6, 7))
    pad5 = np.zeros(5, np.int64)
    tokens = np.stack(
        [full, np.r_[pad5, seq], np.r_[seq, pad5], np.r_[a, b, np.zeros(3, np.int64)]]
    )
    segment_ids = np.ones((4, L), np.int64)
    segment_ids[1, :5] = segment_ids[2, -5:] = 0
    segment_ids[3] = [1] * 6 + [2] * 7 + [0] * 3
    positions = np.clip(np.cumsum(segment_ids > 0, axis=1) - 1, 0, None)
    positions[3] = list(range(6)) + list(range(7)) + [0] * 3
    model, params = case["model"], case["params"]
    got = np.asarray(
        model.apply(
            {"params": params},
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            jnp.asarray(segment_ids, jnp.int32),
        )
    )
    assert np.isfinite(got).all()

    hf = case["hf"]
    want = hf_logits(hf, tokens[:3], segment_ids[:3], positions[:3])
    real = segment_ids[:3] > 0
    np.testing.assert_allclose(got[:3][real], want[real], atol=ATOL, rtol=0)
    alone = hf_logits(hf, seq[None])[0]
    np.testing.assert_allclose(got[1, 5:], alone, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[2, :11], alone, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[3, :6], hf_logits(hf, a[None])[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[3, 6:13], hf_logits(hf, b[None])[0], atol=ATOL, rtol=0)


def test_to_hf_round_trip(case, tmp_path):
    to_hf(case["model"], case["params"], str(tmp_path))
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = np.random.default_rng(3).integers(0, 256, (2, L))
    np.testing.assert_allclose(
        hf_logits(reloaded.eval(), tokens), hf_logits(case["hf"], tokens), atol=1e-6, rtol=0
    )
    model2, params2 = from_hf(str(tmp_path))
    assert model2.config == case["model"].config
    jax.tree.map(np.testing.assert_array_equal, params2, case["params"])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox"])
def test_tiny_config_exports_to_hf(family, tmp_path):
    """Our own tiny configs (the ones other modules test with) are valid HF models."""
    cfg = ModelConfig.tiny(family, max_position_embeddings=32)
    model = DecoderLM(cfg)
    tokens = np.random.default_rng(4).integers(0, 256, (2, L)).astype(np.int32)
    params = random_params(model, seed=family)
    to_hf(model, params, str(tmp_path))
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got = np.asarray(model.apply({"params": params}, tokens))
    np.testing.assert_allclose(got, hf_logits(hf_model.eval(), tokens), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- checkpoint files and errors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_err")
    hf_model = make_hf_model(CASES["llama"]())
    hf_model.save_pretrained(path)
    return path, hf_model


def copy_checkpoint(src, dst, edit=None, config_edit=None):
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def test_sharded_checkpoint(llama_dir, tmp_path):
    _, hf_model = llama_dir
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    model, params = from_hf(str(tmp_path))
    tokens = np.random.default_rng(5).integers(0, 256, (1, L))
    got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, hf_logits(hf_model, tokens), atol=ATOL, rtol=0)


def test_bfloat16_checkpoint_loads_as_float32(llama_dir, tmp_path):
    import ml_dtypes

    path = copy_checkpoint(
        llama_dir[0],
        tmp_path,
        edit=lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}),
    )
    _, params = from_hf(path, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """The original GPT-2 checkpoints name tensors without "transformer." and carry
    causal-mask buffers (h.N.attn.bias); both load."""
    hf_model = make_hf_model(CASES["gpt2"]())
    hf_model.save_pretrained(tmp_path / "src")

    def edit(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.tril(np.ones((32, 32), np.float32))[None, None]

    path = copy_checkpoint(tmp_path / "src", tmp_path, edit=edit)
    model, params = from_hf(path)
    tokens = np.random.default_rng(6).integers(0, 256, (1, 8))
    got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, hf_logits(hf_model, tokens), atol=ATOL, rtol=0)


def test_unsupported_model_type(llama_dir, tmp_path):
    path = copy_checkpoint(
        llama_dir[0], tmp_path, config_edit=lambda c: c.update(model_type="bert")
    )
    with pytest.raises(HFCheckpointError, match="model_type 'bert' is not supported"):
        from_hf(path)


def test_unsupported_rope_type(llama_dir, tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    path = copy_checkpoint(
        llama_dir[0], tmp_path, config_edit=lambda c: c.update(rope_parameters=rope)
    )
    with pytest.raises(HFCheckpointError, match="rope_type 'yarn'"):
        from_hf(path)


def test_missing_tensor(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = copy_checkpoint(llama_dir[0], tmp_path, edit=lambda t: t.pop(name))
    with pytest.raises(HFCheckpointError, match=f"missing tensor.*{name}"):
        from_hf(path)


def test_misshaped_tensor(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = copy_checkpoint(
        llama_dir[0], tmp_path, edit=lambda t: t.update({name: np.zeros((48, 64), np.float32)})
    )
    with pytest.raises(HFCheckpointError) as err:
        from_hf(path)
    assert name in str(err.value) and "(48, 64)" in str(err.value) and "(32, 64)" in str(err.value)


def test_unused_weight_is_an_error_but_buffers_are_ignored(llama_dir, tmp_path):
    extra = "model.layers.0.mlp.extra_proj.weight"
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    path = copy_checkpoint(
        llama_dir[0], tmp_path, edit=lambda t: t.update({buffer: np.ones(8, np.float32)})
    )
    from_hf(path)  # a known non-weight buffer loads fine
    path = copy_checkpoint(
        llama_dir[0], tmp_path, edit=lambda t: t.update({extra: np.ones((4, 4), np.float32)})
    )
    with pytest.raises(HFCheckpointError, match=extra):
        from_hf(path)


def test_missing_files(tmp_path):
    with pytest.raises(HFCheckpointError, match="no config.json"):
        from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(CASES["llama"]().to_dict()))
    with pytest.raises(HFCheckpointError, match="no .*safetensors"):
        from_hf(str(tmp_path))


def test_truncated_or_corrupt_safetensors_names_the_file(llama_dir, tmp_path):
    path = copy_checkpoint(llama_dir[0], tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        from_hf(path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        from_hf(path)


def _shard_into(src, dst, shard_dir, file_name):
    """Saves all tensors of `src` as one shard at `shard_dir/file_name` with an index in
    `dst` naming it by the relative or absolute path `file_name` as written in the index."""
    tensors = load_file(src / "model.safetensors")
    shard_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, shard_dir / os.path.basename(file_name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: file_name for name in tensors}}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return str(dst)


def test_shard_index_may_not_point_outside_the_model_directory(llama_dir, tmp_path):
    src = llama_dir[0]
    inside = _shard_into(src, tmp_path / "ok", tmp_path / "ok" / "sub", "sub/w.safetensors")
    from_hf(inside)  # a subdirectory of the model directory is fine
    model_dir = tmp_path / "model"
    path = _shard_into(src, model_dir, tmp_path / "other", "../other/model.safetensors")
    with pytest.raises(HFCheckpointError, match=r"'\.\./other/model\.safetensors' is outside"):
        from_hf(path)
    absolute = str(tmp_path / "abs" / "model.safetensors")
    path = _shard_into(src, tmp_path / "m2", tmp_path / "abs", absolute)
    with pytest.raises(HFCheckpointError, match="is outside the model directory"):
        from_hf(path)
    # A symlink inside the directory that resolves out of it.
    path = _shard_into(src, tmp_path / "m3", tmp_path / "elsewhere", "w.safetensors")
    os.symlink(tmp_path / "elsewhere" / "w.safetensors", tmp_path / "m3" / "w.safetensors")
    with pytest.raises(HFCheckpointError, match="resolves to .*elsewhere.*symlink"):
        from_hf(path)
    # The same for a single-file checkpoint found by listing the directory.
    (tmp_path / "m3" / "model.safetensors.index.json").unlink()
    with pytest.raises(HFCheckpointError, match="resolves to .*elsewhere.*symlink"):
        from_hf(path)


def test_hub_cache_snapshot_symlinks_into_its_blobs_load(llama_dir, tmp_path):
    # transformers' cache layout: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>.
    src = llama_dir[0]
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(
        load_file(src / "model.safetensors"), repo / "blobs" / "f00d", metadata={"format": "pt"}
    )
    os.symlink("../../blobs/f00d", snapshot / "model.safetensors")
    (snapshot / "config.json").write_text((src / "config.json").read_text())
    from_hf(str(snapshot))


def test_unexportable_config(tmp_path):
    model = DecoderLM(ModelConfig.tiny("llama", parallel_residual=True))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    with pytest.raises(HFCheckpointError, match="parallel_residual"):
        to_hf(model, params, str(tmp_path))
