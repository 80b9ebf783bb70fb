"""Remat policies (`ModelConfig.remat`): the same loss and gradients as no remat, each policy
really applied to every block, and the boolean form still accepted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import DecoderLM, ModelConfig
from dpo_jax.models.config import REMAT_POLICIES, remat_policy


def loss_fn(model, params, tokens):
    logits = model.apply({"params": params}, tokens).astype(jnp.float32)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)


def checkpoint_policies(fn, *args):
    """The `policy` of every checkpoint (remat) equation in the jaxpr of `fn`."""
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return [e.params["policy"] for e in eqns if e.primitive.name in ("remat2", "checkpoint")]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_every_policy_gives_the_same_loss_and_gradients(family):
    cfg = ModelConfig.tiny(family)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    params = DecoderLM(cfg).init(jax.random.key(0), tokens)["params"]
    plain = jax.jit(jax.value_and_grad(lambda p: loss_fn(DecoderLM(cfg), p, tokens)))
    want_loss, want_grads = plain(params)
    for policy in REMAT_POLICIES[1:]:
        model = DecoderLM(cfg.replace(remat=policy))
        loss, grads = jax.jit(jax.value_and_grad(lambda p, m=model: loss_fn(m, p, tokens)))(params)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=policy)
        jax.tree.map(
            lambda a, b, policy=policy: np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-7, err_msg=policy
            ),
            grads,
            want_grads,
        )


def test_each_policy_is_applied_to_every_block():
    cfg = ModelConfig.tiny("llama")
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = DecoderLM(cfg).init(jax.random.key(0), tokens)["params"]
    grad = lambda m: jax.grad(lambda p: loss_fn(m, p, tokens))  # noqa: E731
    assert checkpoint_policies(grad(DecoderLM(cfg)), params) == []
    expected = {
        "full": None,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": (
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        ),
        "offload_dots_with_no_batch_dims": remat_policy("offload_dots_with_no_batch_dims"),
    }
    assert set(expected) == set(REMAT_POLICIES[1:])
    for name, policy in expected.items():
        found = checkpoint_policies(grad(DecoderLM(cfg.replace(remat=name))), params)
        assert found == [policy] * cfg.num_layers, name


def test_boolean_remat_and_unknown_names():
    assert ModelConfig(remat=True).remat == "full"
    assert ModelConfig(remat=False).remat == "none"
    assert ModelConfig(remat=np.bool_(True)).remat == "full"
    with pytest.raises(ValueError, match="remat='everything' not in"):
        ModelConfig(remat="everything")


def test_run_config_keys_are_validated():
    from dpo_jax.train.defaults import base_config, shrink_to_tiny
    from dpo_jax.train.validate import ConfigError, validate

    config = shrink_to_tiny(base_config())
    config.model.remat = "dots_with_no_batch_dims_saveable"
    config.model.scan_layers = True
    validate(config)  # a policy name and the scan switch are valid
    config.model.remat = True  # the boolean form of older configs
    validate(config)
    config.model.remat = "everything"
    with pytest.raises(ConfigError, match="config.model.remat='everything'"):
        validate(config)


def test_offload_policy_moves_the_projections_to_host_memory():
    """The offload policy marks the batch-dim-free matmuls (the projections) as offloaded
    to pinned host memory and recomputes everything else."""
    from jax._src.interpreters import partial_eval as pe

    policy = remat_policy("offload_dots_with_no_batch_dims")
    x = jnp.ones((2, 3, 4))
    w = jnp.ones((4, 5))
    eqn = jax.make_jaxpr(lambda x, w: jnp.einsum("btd,df->btf", x, w))(x, w).jaxpr.eqns[0]
    decision = policy(eqn.primitive, *eqn.invars, **eqn.params)
    assert isinstance(decision, pe.Offloadable)
    assert (decision.src, decision.dst) == ("device", "pinned_host")
    batched = jax.make_jaxpr(lambda a, b: jnp.einsum("bqd,bkd->bqk", a, b))(x, x).jaxpr.eqns[0]
    assert policy(batched.primitive, *batched.invars, **batched.params) == pe.Recompute
