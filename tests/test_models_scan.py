"""Scanned layers (`ModelConfig.scan_layers`): for every family the scan gives the loop's
logits and gradients with the same weights (stacked), Hugging Face import/export works for
both layouts, KV-cache decoding works with the scan, and params carry the "layers" axis."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_models_decoding import compare, random_params

from dpo_jax import parallel
from dpo_jax.models import DecoderLM, ModelConfig, from_hf, to_hf
from dpo_jax.models.config import FAMILIES
from dpo_jax.models.decoder import stack_layers, unstack_layers

LAYERS = 3


def batch(cfg):
    """Two rows: a padded one and a packed one (two segments, positions restarting)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    segment_ids = np.array([[1] * 7 + [0] * 3, [1] * 4 + [2] * 6], np.int32)
    positions = np.array([list(range(10)), list(range(4)) + list(range(6))], np.int32)
    return tokens, positions, segment_ids


def models(family, **overrides):
    cfg = ModelConfig.tiny(family, num_layers=LAYERS, **overrides)
    return DecoderLM(cfg), DecoderLM(cfg.replace(scan_layers=True))


def loss_fn(model, params, tokens, positions, segment_ids):
    logits = model.apply({"params": params}, tokens, positions, segment_ids)
    logps = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.sum(jnp.where(segment_ids[..., None] > 0, logps, 0.0)[..., :8] ** 2) / 100


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_equals_loop_logits_and_gradients(family):
    loop, scan = models(family)
    params = random_params(loop)
    stacked = stack_layers(params, LAYERS)
    # The scan's own init has exactly this structure and these shapes.
    want_shapes = jax.eval_shape(scan.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    assert jax.tree.map(np.shape, nn.unbox(want_shapes["params"])) == jax.tree.map(
        np.shape, stacked
    )
    args = batch(loop.config)
    np.testing.assert_allclose(
        scan.apply({"params": stacked}, *args),
        loop.apply({"params": params}, *args),
        atol=1e-5,
        rtol=1e-5,
    )
    grad = lambda m: jax.jit(jax.grad(lambda p: loss_fn(m, p, *args)))  # noqa: E731
    loop_grads, scan_grads = grad(loop)(params), grad(scan)(stacked)
    assert np.abs(jax.tree.leaves(loop_grads)[0]).max() > 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        unstack_layers(scan_grads),
        loop_grads,
    )


@pytest.mark.parametrize("remat", ["full", "dots_with_no_batch_dims_saveable"])
def test_scan_with_remat_same_gradients(remat):
    loop, scan = models("llama", remat=remat)
    params = random_params(loop)
    args = batch(loop.config)
    want = jax.grad(lambda p: loss_fn(DecoderLM(loop.config.replace(remat="none")), p, *args))
    got = jax.grad(lambda p: loss_fn(scan, p, *args))(stack_layers(params, LAYERS))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        unstack_layers(got),
        want(params),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip_both_layouts(family, tmp_path):
    loop, scan = models(family)
    params = random_params(loop)
    stacked = stack_layers(params, LAYERS)
    to_hf(loop, params, str(tmp_path / "loop"))
    to_hf(scan, stacked, str(tmp_path / "scan"))
    # The scan layout exports the very same tensors as the loop layout.
    a = load_file(str(tmp_path / "loop" / "model.safetensors"))
    b = load_file(str(tmp_path / "scan" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    model, imported = from_hf(str(tmp_path / "scan"), scan_layers=True)
    assert model.config.scan_layers and model.config == scan.config
    jax.tree.map(np.testing.assert_array_equal, imported, jax.tree.map(np.asarray, stacked))
    _, imported_loop = from_hf(str(tmp_path / "scan"))
    jax.tree.map(np.testing.assert_array_equal, imported_loop, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("family", ["mistral", "gpt_neox"])
def test_cached_decoding_with_scan(family):
    """Prefill, a 2-token chunk and single tokens (test_models_decoding's schedule) with the
    scan equal the full forward, and equal the loop's decoding."""
    loop, scan = models(family, sliding_window=3 if family == "mistral" else None)
    params = random_params(loop)
    got = compare(scan, stack_layers(params, LAYERS), atol=1e-5)
    np.testing.assert_allclose(got, compare(loop, params, atol=1e-5), atol=1e-5, rtol=0)


def test_stacked_params_have_a_layers_axis_and_shard():
    _, scan = models("llama")
    boxed = jax.eval_shape(scan.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    specs = parallel.param_logical_specs(boxed)
    assert tuple(specs["layers"]["attn"]["q_kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["embedding"]) == ("vocab", "embed")
    mesh = parallel.make_mesh((1, 4, 2))
    shardings = parallel.state_shardings(
        parallel.unbox(boxed), mesh, parallel.DEFAULT_RULES, param_specs=specs
    )
    # "layers" has no rule: the stacked dim stays whole, the rest shards as in the loop.
    assert shardings["layers"]["attn"]["q_kernel"].spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )


def test_layouts_are_checked():
    with pytest.raises(ValueError, match="not a 3-layer loop layout"):
        stack_layers({"layers_0": {}, "layers_1": {}}, 3)
    with pytest.raises(ValueError, match="not a scan layout"):
        unstack_layers({"layers_0": {}})


def test_a_training_run_with_scanned_layers_equals_the_loop(tmp_path):
    """`config.model.scan_layers` reaches the model: from the same Hugging Face weights, the
    run's params are stacked and its losses equal the same run with a loop over layers."""
    from test_loop import load_config, read_metrics

    from dpo_jax.train import loop

    model = DecoderLM(ModelConfig.tiny(vocab_size=100, num_layers=2))
    hf_dir = str(tmp_path / "hf")
    to_hf(model, random_params(model, 0), hf_dir)
    losses = {}
    for scan in (False, True):
        config = load_config("dpo")
        with config.unlocked():
            config.model.preset = ""
            config.model.hf_path = hf_dir
            config.model.scan_layers = scan
            config.dpo.steps = 3
        workdir = str(tmp_path / f"scan_{scan}")
        params = loop.run(config, workdir)
        assert ("layers" in params) == scan  # stacked under one "layers" subtree
        records = read_metrics(workdir)
        losses[scan] = [r["loss"] for r in records if r["stage"] == "dpo" and "loss" in r]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
