"""dpo_jax.parallel on 8 fake CPU devices: meshes, rule tables, state and batch shardings,
the jitted step's activation constraints, and the key property: every mesh layout and the
pmap path train exactly like one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import parallel_testlib as lib
import pytest
from jax.sharding import PartitionSpec as P

from dpo_jax import parallel
from dpo_jax.train.steps import make_dpo_step

# ------------------------------------------------------------------------------------------
# Meshes and rules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",
    [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 1, -1), (1, 1, 8)),
     ((2, 4, 1), (2, 4, 1))],
)  # fmt: skip
def test_make_mesh_shapes(shape, expected):
    mesh = parallel.make_mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == expected
    assert set(mesh.devices.flat) == set(jax.devices())


def test_make_mesh_on_a_subset_of_devices():
    mesh = parallel.make_mesh((1, 1, -1), devices=jax.devices()[:2])
    assert tuple(mesh.shape.values()) == (1, 1, 2)
    assert set(mesh.devices.flat) == set(jax.devices()[:2])


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 1, 1), "needs 3 devices, but 8 are available"),
        ((4, 4, 1), "needs 16 devices, but 8 are available"),
        ((-1, 3, 1), "not divisible by the fixed axes' product 3"),
        ((-1, -1, 1), "at most one -1"),
        ((0, 1, 1), "must be positive"),
        ((2, 4), "must have 3 entries"),
    ],
)
def test_make_mesh_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(shape)


def test_check_rules_rejects_unknown_mesh_axes_and_bad_pairs():
    mesh = parallel.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match=r"'model'.*not in \('data', 'fsdp', 'tensor'\)"):
        parallel.check_rules((("embed", "model"),), mesh)
    with pytest.raises(ValueError, match="not a \\(logical_name, mesh_axes\\) pair"):
        parallel.check_rules((("embed",),), mesh)
    # Lists (as a config may hold them) are accepted and normalised to tuples.
    assert parallel.check_rules([["embed", "fsdp"]], mesh) == (("embed", "fsdp"),)


# ------------------------------------------------------------------------------------------
# State shardings
# ------------------------------------------------------------------------------------------


def _specs(shardings):
    return jax.tree.map(lambda s: s.spec, shardings)


def _by_path(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): x for path, x in flat}


def test_param_and_optimizer_shardings_follow_the_rules():
    abstract, _ = lib.initial_state()
    mesh = parallel.make_mesh((2, 2, 2))
    shardings = parallel.state_shardings(abstract, mesh, parallel.DEFAULT_RULES)
    params = _specs(shardings.params)
    assert params["layers_0"]["mlp"]["up_kernel"] == P("fsdp", "tensor")  # [embed, mlp]
    assert params["layers_0"]["mlp"]["down_kernel"] == P("tensor", "fsdp")  # [mlp, embed]
    assert params["layers_1"]["attn"]["q_kernel"] == P("fsdp", "tensor", None)
    assert params["layers_1"]["attn"]["o_kernel"] == P("tensor", None, "fsdp")
    assert params["embedding"] == P("tensor", "fsdp")  # [vocab, embed]
    assert params["lm_head"] == P("fsdp", "tensor")
    assert params["final_norm"]["scale"] == P(None)
    assert shardings.step.spec == P() and shardings.rng.spec == P()
    # Optimizer moments mirror the params; scalars (counts, learning rate) are replicated.
    opt = _by_path(_specs(shardings.opt_state))
    moments = {k: v for k, v in opt.items() if k.endswith("['layers_0']['mlp']['up_kernel']")}
    assert moments and all(v == P("fsdp", "tensor") for v in moments.values())
    scalars = _by_path(jax.tree.map(lambda x: x.ndim == 0, parallel.unbox(abstract.opt_state)))
    assert any(scalars.values())
    assert all(opt[k] == P() for k, is_scalar in scalars.items() if is_scalar)
    assert all(s.mesh == mesh for s in jax.tree.leaves(shardings))
    # The same inside a mesh + rules context (where flax's own unbox would constrain).
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        again = parallel.state_shardings(abstract, mesh, parallel.DEFAULT_RULES)
    assert _specs(again) == _specs(shardings)


def test_unboxed_state_with_param_specs_gets_the_same_shardings():
    abstract, _ = lib.initial_state()
    mesh = parallel.make_mesh((2, 2, 2))
    boxed = parallel.state_shardings(abstract, mesh, parallel.DEFAULT_RULES)
    unboxed = parallel.state_shardings(
        parallel.unbox(abstract),
        mesh,
        parallel.DEFAULT_RULES,
        param_specs=parallel.param_logical_specs(abstract.params),
    )
    assert jax.tree.structure(boxed) == jax.tree.structure(parallel.unbox(abstract))
    assert _specs(boxed) == _specs(unboxed)
    # Without the specs an unboxed state can only be replicated.
    plain = parallel.state_shardings(parallel.unbox(abstract), mesh, parallel.DEFAULT_RULES)
    assert all(s.spec == P() for s in jax.tree.leaves(plain))


def test_reference_rule_variants():
    abstract, _ = lib.initial_state()
    mesh = parallel.make_mesh((2, 2, 2))

    def specs(name):
        return _specs(
            parallel.state_shardings(abstract.params, mesh, parallel.REFERENCE_RULES[name])
        )

    assert specs("same") == _specs(
        parallel.state_shardings(abstract.params, mesh, parallel.DEFAULT_RULES)
    )
    tensor = specs("tensor")
    assert tensor["embedding"] == P("tensor", None)
    assert tensor["layers_0"]["mlp"]["up_kernel"] == P(None, "tensor")
    assert all(all(a is None for a in s) for s in jax.tree.leaves(specs("replicated")))


def test_indivisible_dims_are_left_unsharded():
    abstract, _ = lib.initial_state()  # 4 query heads, 2 kv heads
    mesh = parallel.make_mesh((2, 1, 4))
    params = _specs(parallel.state_shardings(abstract, mesh, parallel.DEFAULT_RULES).params)
    assert params["layers_0"]["attn"]["q_kernel"] == P("fsdp", "tensor", None)
    assert params["layers_0"]["attn"]["k_kernel"] == P("fsdp", None, None)


def test_init_sharded_creates_the_state_on_the_mesh():
    abstract, host = lib.initial_state()
    mesh = parallel.make_mesh((2, 2, 2))
    state, shardings = parallel.init_sharded(
        lib.make_init(lib.tiny_model(), lib.optimizer(), unbox=False),
        jax.random.key(0),
        mesh=mesh,
        rules=parallel.DEFAULT_RULES,
        compiler_options=lib.FAST_COMPILE,
    )
    assert jax.tree.structure(state) == jax.tree.structure(host)
    kernel = state.params["layers_0"]["mlp"]["up_kernel"]
    assert kernel.sharding == shardings.params["layers_0"]["mlp"]["up_kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (64 // 2, 128 // 2)
    jax.tree.map(np.testing.assert_array_equal, lib.to_numpy(state), host)


def test_put_sharded_copies():
    mesh = parallel.make_mesh((8, 1, 1))
    x = jax.device_put(jnp.arange(8.0), parallel.batch_sharding(mesh))
    y = parallel.put_sharded({"x": x}, {"x": parallel.batch_sharding(mesh)})["x"]
    x.delete()  # e.g. donated: the copy must survive
    np.testing.assert_array_equal(np.asarray(y), np.arange(8.0))


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def test_shard_batch_splits_the_leading_dim_over_data_and_fsdp():
    mesh = parallel.make_mesh((2, 2, 2))
    batch = lib.make_batch(0)
    sharded = parallel.shard_batch(batch, mesh)
    for name, x in sharded.items():
        assert x.sharding.spec == P(("data", "fsdp"))
        assert x.shape == batch[name].shape
        assert x.addressable_shards[0].data.shape[0] == lib.NUM_PAIRS // 4
        np.testing.assert_array_equal(np.asarray(x), batch[name])


def test_shard_batch_names_the_field_that_does_not_divide():
    mesh = parallel.make_mesh((2, 2, 2))
    batch = lib.make_batch(0, num_pairs=6)
    with pytest.raises(ValueError, match=r"field \['loss_mask'\] has shape \(6, 2, 16\)"):
        parallel.shard_batch(batch, mesh)
    with pytest.raises(ValueError, match=r"shard_batch_pmap: field \['loss_mask'\]"):
        parallel.shard_batch_pmap(batch)


def test_pmap_helpers():
    batch = parallel.shard_batch_pmap(lib.make_batch(0))
    assert batch["tokens"].shape == (8, 1, 2, lib.LENGTH)
    assert {s.device for s in batch["tokens"].addressable_shards} == set(jax.local_devices())
    tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(3)}
    replicated = parallel.replicate(tree)
    assert replicated["w"].shape == (8, 2, 3) and replicated["step"].shape == (8,)
    assert len({s.device for s in replicated["w"].addressable_shards}) == 8
    back = parallel.unreplicate(replicated)
    np.testing.assert_array_equal(np.asarray(back["w"]), tree["w"])
    assert int(back["step"]) == 3


# ------------------------------------------------------------------------------------------
# The jitted step
# ------------------------------------------------------------------------------------------


def test_jit_step_binds_the_models_activation_constraints_to_the_mesh():
    abstract, host = lib.initial_state()
    mesh = parallel.make_mesh((2, 2, 2))
    shardings = parallel.state_shardings(abstract, mesh, parallel.DEFAULT_RULES)
    state = parallel.put_sharded(host, shardings)
    step = parallel.jit_step(
        make_dpo_step(model=lib.tiny_model(), tx=lib.optimizer()),
        mesh,
        shardings,
        shardings.params,
        parallel.batch_sharding(mesh),
    )
    args = (state, parallel.shard_batch(lib.make_batch(0), mesh), state.params)
    text = step.lower(*args).as_text()
    # act_batch -> ("data", "fsdp"), act_heads / act_mlp -> "tensor"
    assert "sdy.sharding_constraint %" in text
    assert '[{"data", "fsdp"}, {}, {"tensor"}, {}]' in text
    # The same function lowered outside the mesh / rules context has no constraints.
    jitted = jax.jit(make_dpo_step(model=lib.tiny_model(), tx=lib.optimizer()))
    assert "sharding_constraint" not in jitted.lower(*args).as_text()


# ------------------------------------------------------------------------------------------
# Every layout trains like one device
# ------------------------------------------------------------------------------------------

STEPS = 3


@pytest.fixture(scope="module")
def batches():
    return [lib.make_batch(seed) for seed in range(STEPS)]


@pytest.fixture(scope="module")
def single_device(batches):
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return lib.run_jit(mesh, batches)


@pytest.mark.parametrize(
    "layout, reference_rules",
    [((8, 1, 1), "same"), ((2, 4, 1), "same"), ((2, 2, 2), "same"), ((2, 2, 2), "tensor"),
     ("pmap", None)],
)  # fmt: skip
def test_layout_matches_single_device(layout, reference_rules, batches, single_device):
    if layout == "pmap":
        losses, params = lib.run_pmap(batches)
    else:
        losses, params = lib.run_jit(
            parallel.make_mesh(layout), batches, reference_rules=reference_rules
        )
    want_losses, want_params = single_device
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)

    def close(got, want):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    jax.tree.map(close, params, want_params)
    # The comparison is not vacuous: training moved the params well beyond the tolerance.
    _, initial = lib.initial_state()
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), want_params, initial.params)
    assert max(jax.tree.leaves(moved)) > 1e-2


# ------------------------------------------------------------------------------------------
# Multi-host setup (the real 2-process run is in test_multihost.py)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID,
                 "JAX_COORDINATOR_ADDRESS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_distributed_is_a_no_op_for_one_process(clean_env):
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed("127.0.0.1:1234", num_processes=1, process_id=0) is False
    clean_env.setenv(parallel.ENV_NUM_PROCESSES, "1")
    assert parallel.initialize_distributed() is False
    assert not jax.distributed.is_initialized()


def test_initialize_distributed_rejects_incomplete_or_bad_settings(clean_env):
    with pytest.raises(ValueError, match=r"\['num_processes', 'process_id'\] not given"):
        parallel.initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"process_id=2 not in \[0, 2\)"):
        parallel.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)
    clean_env.setenv(parallel.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="DPO_JAX_NUM_PROCESSES='two' is not an integer"):
        parallel.initialize_distributed("127.0.0.1:1234")
    assert not jax.distributed.is_initialized()
