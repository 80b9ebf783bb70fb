"""DecoderLM contracts that need no reference implementation: features, dtypes, remat,
logical partitioning, sharded execution, input validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax.models import DecoderLM, ModelConfig

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox"]
PARAM_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}


def random_params(model, seed=0):
    """Random float32 params with the shapes of model.init, without compiling an init
    (random-number kernels take seconds to compile on CPU). Norm scales near 1."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32)))

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def tokens_batch(b=2, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, length)), jnp.int32)


def loss_fn(model, params, tokens, segment_ids=None):
    logits = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    logps = jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1])
    picked = jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = jnp.ones_like(picked) if segment_ids is None else (segment_ids[:, 1:] > 0)
    return -(picked * mask).sum() / mask.sum()


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_neox"])
def test_features_times_unembed_is_logits(family):
    model = DecoderLM(ModelConfig.tiny(family))
    params, tokens = random_params(model), tokens_batch()
    logits = model.apply({"params": params}, tokens)
    hidden, unembed = model.apply({"params": params}, tokens, method="features")
    assert hidden.shape == (2, 12, 64) and unembed.shape == (64, 256)
    assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
    np.testing.assert_allclose(hidden @ unembed, logits, atol=1e-5, rtol=0)
    # Defaults are arange positions and all-ones segments.
    explicit = model.apply(
        {"params": params},
        tokens,
        positions=jnp.broadcast_to(jnp.arange(12), (2, 12)),
        segment_ids=jnp.ones((2, 12), jnp.int32),
    )
    np.testing.assert_array_equal(explicit, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_close_to_float32(family):
    cfg = ModelConfig.tiny(family)
    params, tokens = random_params(DecoderLM(cfg)), tokens_batch()
    f32 = DecoderLM(cfg).apply({"params": params}, tokens)
    bf16_model = DecoderLM(cfg.replace(dtype="bfloat16"))
    bf16 = bf16_model.apply({"params": params}, tokens)
    hidden, unembed = bf16_model.apply({"params": params}, tokens, method="features")
    assert bf16.dtype == hidden.dtype == unembed.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: after 2 layers logits are within ~1% of their range.
    scale = float(jnp.abs(f32).max())
    err = float(jnp.abs(f32 - bf16.astype(jnp.float32)).max())
    assert scale > 1.0 and err < 0.03 * scale, (err, scale)
    np.testing.assert_allclose(
        jax.nn.log_softmax(bf16.astype(jnp.float32)), jax.nn.log_softmax(f32), atol=0.03 * scale
    )


def test_remat_same_values_and_gradients():
    cfg = ModelConfig.tiny("llama")
    plain, remat = DecoderLM(cfg), DecoderLM(cfg.replace(remat=True))
    params, tokens = random_params(plain), tokens_batch()
    plain_loss = lambda p: loss_fn(plain, p, tokens)
    remat_loss = lambda p: loss_fn(remat, p, tokens)
    loss_plain, grads_plain = jax.jit(jax.value_and_grad(plain_loss))(params)
    loss_remat, grads_remat = jax.jit(jax.value_and_grad(remat_loss))(params)
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
        grads_remat,
        grads_plain,
    )

    # One checkpointed region (jax.checkpoint's primitive) per block, none without the switch.
    def num_remat(fn):
        eqns = jax.make_jaxpr(fn)(params).jaxpr.eqns
        return sum(e.primitive.name in ("remat2", "checkpoint") for e in eqns)

    assert num_remat(remat_loss) == cfg.num_layers
    assert num_remat(plain_loss) == 0


def test_padding_gives_finite_gradients():
    model = DecoderLM(ModelConfig.tiny("mistral"))
    params, tokens = random_params(model), tokens_batch()
    segment_ids = jnp.ones((2, 12), jnp.int32).at[1, 7:].set(0)
    grads = jax.jit(jax.grad(lambda p: loss_fn(model, p, tokens, segment_ids)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_segments_are_isolated_and_causal():
    model = DecoderLM(ModelConfig.tiny("gemma"))
    params, tokens = random_params(model), tokens_batch(b=1)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    base = model.apply({"params": params}, tokens, positions, segment_ids)
    # Changing segment 2 leaves segment 1 alone; changing token 8 leaves tokens < 8 alone.
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % 256)
    after = model.apply({"params": params}, changed, positions, segment_ids)
    np.testing.assert_array_equal(after[0, :8], base[0, :8])
    assert float(jnp.abs(after[0, 8:] - base[0, 8:]).max()) > 1e-3


def test_params_have_logical_axis_names():
    for family in FAMILIES:
        model = DecoderLM(ModelConfig.tiny(family))
        boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
        leaves = jax.tree.leaves(
            boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= PARAM_AXES
            assert leaf.value.dtype == jnp.float32
    specs = nn.get_partition_spec(boxed)["params"]  # gpt_neox, untied
    assert tuple(specs["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]) == ("embed", "vocab")
    assert tuple(specs["layers_0"]["attn"]["q_kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(specs["layers_1"]["mlp"]["down_kernel"]) == ("mlp", "embed")


def test_sharded_apply_matches_unsharded():
    """Logical names map onto a (data=2, tensor=4) mesh of fake CPU devices."""
    cfg = ModelConfig.tiny("llama")
    model = DecoderLM(cfg)
    params, tokens = random_params(model), tokens_batch()
    rules = (
        ("act_batch", "data"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("act_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    )
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert sharded["layers_0"]["mlp"]["up_kernel"].sharding.spec == P(None, "tensor")
    # flax applies activation constraints only under jax.set_mesh (a legacy `with mesh:`
    # leaves them as silent no-ops, and then the logits below would not be data-sharded).
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, tokens)
    assert isinstance(logits.sharding, NamedSharding)
    assert logits.sharding.spec[0] == "data"
    want = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)


def test_bad_inputs_and_configs():
    with pytest.raises(ValueError, match="num_heads=4 not divisible by num_kv_heads=3"):
        ModelConfig.tiny("llama", num_kv_heads=3)
    with pytest.raises(ValueError, match="family='bert'"):
        ModelConfig.tiny("bert")
    with pytest.raises(ValueError, match="activation='gelu_fast'"):
        ModelConfig(activation="gelu_fast")
    model = DecoderLM(ModelConfig.tiny("llama"))
    params, tokens = random_params(model), tokens_batch()
    with pytest.raises(ValueError, match=r"positions shape \(2, 5\) != tokens shape \(2, 12\)"):
        model.apply({"params": params}, tokens, positions=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must be \[B, L\]"):
        model.apply({"params": params}, tokens[0])
    with pytest.raises(ValueError, match="tokens must be integers"):
        model.apply({"params": params}, tokens.astype(jnp.float32))
    gpt2 = DecoderLM(ModelConfig.tiny("gpt2", max_position_embeddings=8))
    with pytest.raises(ValueError, match="length 12 exceeds max_position_embeddings=8"):
        gpt2.apply({"params": random_params(gpt2)}, tokens)
