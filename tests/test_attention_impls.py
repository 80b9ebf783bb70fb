"""Attention kernels (`ModelConfig.attention`) against the einsum ("xla"): the same logits
at every real token and the same gradients, float32, on padded batches (one sequence per
row, rows of different lengths) and packed ones (several sequences per row, positions
restarting at each), for Llama (GQA), Gemma (one kv head) and Mistral (sliding window).

"dot_product" is jax.nn.dot_product_attention, which runs on CPU. "splash" is the Pallas
TPU kernel: on a CPU backend `attention.splash_attention` lowers it in Pallas interpret
mode, the kernel's own code (blocking, segment ids, custom VJP) run as XLA ops, so its
values are compared here too, alone and sharded under a mesh. What interpret mode cannot
show is the Mosaic (TPU) lowering: that is compiled ahead of time for a v5e:2x2 topology
below, when libtpu is installed.
"""

from __future__ import annotations

import importlib.util
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_validate import _problems, _tiny

from dpo_jax import parallel
from dpo_jax.models import DecoderLM, ModelConfig, attention, init_cache
from dpo_jax.models.config import ATTENTION_IMPLS

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def padded_batch(length: int):
    """tokens, positions, segment_ids [2, length]: one sequence per row, the second row
    5/8 full and right-padded (segment 0)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, length)).astype(np.int32)
    segment_ids = np.ones((2, length), np.int32)
    segment_ids[1, length * 5 // 8 :] = 0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length)).copy()
    return tokens, positions, segment_ids


def packed_batch(length: int):
    """tokens, positions, segment_ids [2, length]: three and two sequences per row (lengths
    in eighths of `length`), positions restarting at each, the last eighth padding."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (2, length)).astype(np.int32)
    segment_ids = np.zeros((2, length), np.int32)
    positions = np.zeros((2, length), np.int32)
    eighth = length // 8
    for row, lengths in enumerate(((2, 3, 2), (4, 3))):
        start = 0
        for segment, n in enumerate(lengths, start=1):
            end = start + n * eighth
            segment_ids[row, start:end] = segment
            positions[row, start:end] = np.arange(end - start)
            start = end
    return tokens, positions, segment_ids


LAYOUTS = {"padded": padded_batch, "packed": packed_batch}


def logits_and_grads(config: ModelConfig, params, batch):
    """Logits [B, L, V] and the gradient of the mean next-token NLL over real tokens."""
    tokens, positions, segment_ids = map(jnp.asarray, batch)
    real = segment_ids != 0
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(p):
        logits = DecoderLM(config).apply({"params": p}, tokens, positions, segment_ids)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(real, nll, 0.0)) / jnp.sum(real), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def assert_same(actual, expected, batch):
    """Logits equal at real tokens (padding outputs are never read), gradients everywhere."""
    (logits, grads), (ref_logits, ref_grads) = actual, expected
    real = batch[2] != 0
    np.testing.assert_allclose(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        np.testing.assert_allclose(
            g, flat_ref[path], atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path)
        )


def init_params(config: ModelConfig, tokens):
    """Params, jitted: an eager init compiles every op on its own, which is most of a test."""
    return jax.jit(DecoderLM(config).init)(jax.random.key(0), jnp.asarray(tokens))["params"]


def check_against_xla(config: ModelConfig, implementation: str, batch):
    params = init_params(config, batch[0])
    expected = logits_and_grads(config, params, batch)
    actual = logits_and_grads(config.replace(attention=implementation), params, batch)
    assert_same(actual, expected, batch)


# Llama on both layouts; the other family on packed rows, which end in padding too.
@pytest.mark.parametrize(
    "family, layout", [("llama", "padded"), ("llama", "packed"), ("mistral", "packed")]
)
def test_dot_product_equals_xla(family, layout):
    # Mistral's tiny window (8) is shorter than its sequences (up to 16 tokens): it binds.
    # One layer: the kernel is all that differs, and compiles are most of the test's time.
    config = ModelConfig.tiny(family, num_layers=1)
    check_against_xla(config, "dot_product", LAYOUTS[layout](32))


@pytest.mark.parametrize(
    "family, layout", [("llama", "padded"), ("llama", "packed"), ("gemma", "packed")]
)
def test_splash_equals_xla_in_interpret_mode(family, layout):
    # Gemma: one kv head for all four query heads, and 120 tokens, which splash pads to
    # its 128-token block; Llama's 128 are one block as they come.
    config = ModelConfig.tiny(family, num_layers=1)
    check_against_xla(config, "splash", LAYOUTS[layout](120 if family == "gemma" else 128))


def test_splash_under_a_mesh_runs_per_shard_and_equals_xla():
    """Batch over "data", heads over "tensor" (2 q heads and 1 kv head per shard: whole
    GQA groups), through the shard_map the train steps' `jax.set_mesh` selects."""
    config = ModelConfig.tiny("llama", num_layers=1)  # N=4, K=2
    batch = packed_batch(128)
    params = init_params(config, batch[0])
    expected = logits_and_grads(config, params, batch)

    mesh = parallel.make_mesh((2, 1, 2), devices=jax.devices()[:4])
    splash = config.replace(attention="splash")
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    sharded = tuple(jax.device_put(x, rows) for x in batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        jaxpr = jax.make_jaxpr(lambda p: DecoderLM(splash).apply({"params": p}, *sharded))
        assert "shard_map" in str(jaxpr(params))
        actual = logits_and_grads(splash, params, sharded)
    assert_same(actual, expected, batch)


def test_every_config_choice_has_an_implementation():
    assert tuple(attention.IMPLEMENTATIONS) == ATTENTION_IMPLS


def test_unknown_attention_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"attention='flash' not in \('xla', 'dot_product'"):
        ModelConfig.tiny("llama", attention="flash")


def test_splash_refuses_a_sliding_window_instead_of_ignoring_it():
    with pytest.raises(ValueError, match="cannot apply sliding_window=8"):
        ModelConfig.tiny("mistral", attention="splash")


def test_only_the_full_forward_calls_the_kernel():
    """KV-cache decoding keeps the einsum whatever config.attention says; init too (its
    output is dropped, and its dummy batch is a single token)."""
    model = DecoderLM(ModelConfig.tiny("llama", num_layers=1, attention="splash"))
    tokens = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    init = jax.make_jaxpr(model.init)(jax.random.key(0), tokens)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    forward = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(params, tokens)
    decode = jax.make_jaxpr(
        lambda p, t, c: model.apply({"params": p}, t, None, c, method="decode")
    )(params, tokens, init_cache(model.config, 2, 16))
    assert "pallas_call" in str(forward)
    assert "pallas_call" not in str(init) and "pallas_call" not in str(decode)


def test_validate_names_the_attention_key():
    expected = (
        "config.model.attention='flash': expected one of "
        "('xla', 'dot_product', 'splash', 'blocked')"
    )
    assert expected in _problems(_tiny(**{"model.attention": "flash"}))


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_splash_compiles_to_the_mosaic_kernel_for_a_tpu_topology():
    """The forward and backward of a tiny bfloat16 model, AOT-compiled for v5e:2x2 on a
    (data 2, tensor 2) mesh: each layer is three Mosaic kernels (forward, dq, dkv)."""
    from dpo_jax import plan

    topology = plan.Topology.get("v5e:2x2")
    mesh = parallel.make_mesh((2, 1, 2), devices=topology.devices)
    config = ModelConfig.tiny("llama", head_dim=128, dtype="bfloat16", attention="splash")
    model = DecoderLM(config)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    rules = parallel.DEFAULT_RULES
    params, specs = parallel.unbox(boxed["params"]), parallel.param_logical_specs(boxed["params"])
    shardings = parallel.state_shardings(params, mesh, rules, param_specs=specs)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    rows = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=parallel.batch_sharding(mesh))

    def loss(p, tokens, segment_ids):
        with nn.logical_axis_rules(rules):
            logits = model.apply({"params": p}, tokens, None, segment_ids)
        return jnp.mean(logits.astype(jnp.float32))

    # conftest's "highest" matmul precision would ask Mosaic for a float32-exact bf16 dot,
    # which it rejects ("Bad lhs type"); training runs at the default precision.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(jax.grad(loss)).lower(params, rows, rows).compile()
    targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
    assert targets.count("tpu_custom_call") == 3 * config.num_layers
