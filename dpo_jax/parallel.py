"""Device meshes, logical-axis rules, shardings, the jit/pmap step wrappers, multi-host setup.

Two ways to run the train step on many devices:

- "jit" (default): one global program on a mesh with axes ("data", "fsdp", "tensor").
  Batches are split over ("data", "fsdp"); parameters and optimizer state are sharded by
  logical-axis rules (FSDP over "fsdp" on the embed dim, tensor parallel over "tensor" on
  heads / kv_heads / mlp / vocab). XLA inserts the collectives.
- "pmap": classic data parallelism. Every local device holds a full copy of the state
  (leading device axis), the batch is split as [n_dev, B / n_dev, ...] and the step averages
  gradients with `lax.pmean` over `PMAP_AXIS` (the step's `axis_name`).

Boxed vs unboxed params: the model creates its params as `nn.LogicallyPartitioned` boxes
(logical axis names). The train state this module shards holds plain, *unboxed* arrays:
optax, orbax, Hugging Face import/export and notebooks then see ordinary pytrees, and the
policy and the reference (which comes unboxed from `from_hf`) look the same. The logical
names are read once, from an abstract (`jax.eval_shape`) tree, and turned into a separate
pytree of `NamedSharding`s of the same structure as the unboxed state; that pytree is what
`jax.jit` gets as in/out shardings. `state_shardings` accepts either form of abstract state:
boxed (optimizer initialised on boxed params, so its moments carry the boxes too), or
unboxed plus `param_specs` (optimizer moments are recognised by having the params' tree
structure).

The mapping from logical names to mesh axes is a rule table passed in from the config,
never read by the model. `DEFAULT_RULES` is the policy's; `REFERENCE_RULES` holds variants
for the frozen reference (it needs no optimizer state, so it can afford replication).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The leading (batch / packed-row) dim of every batch array is split over these axes.
BATCH_AXES = ("data", "fsdp")
# Axis name of the pmap path; the step's `axis_name` must be this name.
PMAP_AXIS = "batch"

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Activations: batch over data x fsdp, heads / mlp / vocab over tensor; length and the model
# width stay whole (sequence parallelism is not worth it at the sizes DPO runs at).
ACTIVATION_RULES: Rules = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Params: FSDP over "fsdp" on the model width, tensor parallel over "tensor" on heads, kv
# heads, mlp and vocab. For an [embed, mlp] kernel this gives P("fsdp", "tensor").
DEFAULT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    *ACTIVATION_RULES,
)

# The frozen reference needs no optimizer state and no gradients, so it can trade memory
# for less communication. Chosen by name from the config.
REFERENCE_RULES: dict[str, Rules] = {
    # Sharded exactly like the policy (the largest models).
    "same": DEFAULT_RULES,
    # Tensor parallel only: no all-gather of the weights over "fsdp" in the forward pass.
    "tensor": (
        ("vocab", "tensor"),
        ("embed", None),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("norm", None),
        *ACTIVATION_RULES,
    ),
    # A full copy on every device (small models: no weight communication at all).
    "replicated": (
        ("vocab", None),
        ("embed", None),
        ("heads", None),
        ("kv_heads", None),
        ("head_dim", None),
        ("mlp", None),
        ("norm", None),
        *ACTIVATION_RULES,
    ),
}


# ------------------------------------------------------------------------------------------
# Mesh and rules
# ------------------------------------------------------------------------------------------


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") of sizes `shape` over `devices`.

    One entry of `shape` may be -1, meaning "all remaining devices". The product must equal
    the number of devices (default: all devices of all processes). Axes are `Auto` (GSPMD):
    shardings come from the jit in/out shardings and the models' logical constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(s) for s in shape)
    n = len(devices)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"mesh shape {shape}: entries must be positive, with at most one -1 (= the rest)"
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ValueError(
                f"mesh shape {shape}: {n} devices are not divisible by the fixed axes' "
                f"product {known}"
            )
        shape = tuple(n // known if s == -1 else s for s in shape)
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices, but {n} are available; use -1 for one axis to take the rest"
        )
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _rule_axes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_rules(rules: Rules, mesh: Mesh | None = None) -> Rules:
    """Validates a rule table (from a config) and returns it as a tuple of pairs."""
    rules = tuple(tuple(pair) for pair in rules)
    for pair in rules:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(
                f"logical_axis_rules: {pair!r} is not a (logical_name, mesh_axes) pair"
            )
        axes = _rule_axes(pair[1])
        if not all(isinstance(a, str) for a in axes):
            raise ValueError(f"logical_axis_rules: mesh axes of {pair!r} must be names or None")
        known = MESH_AXES if mesh is None else mesh.axis_names
        unknown = [a for a in axes if a not in known]
        if unknown:
            raise ValueError(
                f"logical_axis_rules: rule {pair!r} names mesh axes {unknown} not in {known}"
            )
    return rules


def logical_to_mesh_spec(
    logical: P | Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules
) -> P:
    """Mesh PartitionSpec for an array of `shape` with logical axis names `logical`.

    A dim whose size does not divide by the product of its mesh axes is left unsharded (and
    logged): e.g. 2 kv heads on a tensor axis of 4. GSPMD would otherwise pad it.
    """
    if logical is None or len(logical) == 0:
        return P()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match array shape {tuple(shape)}")
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    out = []
    for name, dim, axes in zip(logical, shape, spec, strict=True):
        size = math.prod(mesh.shape[a] for a in _rule_axes(axes))
        if dim % size:
            log.info("dim %r of size %d not divisible by mesh %s: unsharded", name, dim, axes)
            axes = None
        out.append(axes)
    return P(*out)


# ------------------------------------------------------------------------------------------
# State shardings and sharded init
# ------------------------------------------------------------------------------------------


def _is_box(x) -> bool:
    return isinstance(x, meta.Partitioned)  # nn.LogicallyPartitioned is a subclass


def _leaf_sharding(mesh: Mesh, rules: Rules, x, logical) -> NamedSharding:
    if not hasattr(x, "shape") or len(x.shape) == 0:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_mesh_spec(logical, x.shape, mesh, rules))


def param_logical_specs(boxed_params: Any) -> Any:
    """Logical PartitionSpecs (one per array) of a boxed param tree, e.g. from
    `jax.eval_shape(model.init, rng, tokens)["params"]`; unboxed arrays get P()."""
    return nn.get_partition_spec(boxed_params)


def state_shardings(
    abstract_state: Any, mesh: Mesh, rules: Rules, *, param_specs: Any = None
) -> Any:
    """NamedShardings for the *unboxed* form of `abstract_state`.

    abstract_state: usually `jax.eval_shape(create_train_state, ...)`; any pytree of arrays
      or ShapeDtypeStructs, with or without `nn.LogicallyPartitioned` boxes.
    param_specs: logical specs of the params (`param_logical_specs`) for unboxed states.
      Every subtree with the params' tree structure (params, optimizer moments) gets them.
    Boxed leaves follow their own logical names; everything else (step, rng, optimizer
    counts, scalars) is replicated.
    """
    rules = check_rules(rules, mesh)
    if param_specs is not None:
        treedef = jax.tree.structure(param_specs, is_leaf=lambda x: isinstance(x, P))

        def mirrors_params(x) -> bool:
            return jax.tree.structure(x, is_leaf=_is_box) == treedef

        def subtree(x):
            if mirrors_params(x):
                return jax.tree.map(
                    lambda a, s: _leaf_sharding(mesh, rules, unbox(a), s),
                    x,
                    param_specs,
                    is_leaf=_is_box,
                )
            return _tree_shardings(x, mesh, rules)

        return jax.tree.map(
            subtree, abstract_state, is_leaf=lambda x: _is_box(x) or mirrors_params(x)
        )
    return _tree_shardings(abstract_state, mesh, rules)


def _tree_shardings(tree, mesh, rules):
    def leaf(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return _leaf_sharding(mesh, rules, x.value, x.get_partition_spec())
        if _is_box(x):  # nn.Partitioned: already mesh axis names
            return NamedSharding(mesh, x.get_partition_spec())
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, tree, is_leaf=_is_box)


def unbox(tree: Any) -> Any:
    """Strips `nn.LogicallyPartitioned` boxes. Unlike `nn.meta.unbox` it never applies a
    sharding constraint, so it is safe on abstract values and inside a mesh context."""
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def init_sharded(
    init_fn: Callable[..., Any],
    *args,
    mesh: Mesh,
    rules: Rules,
    param_specs: Any = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` under jit so that its result is created already sharded.

    Returns (unboxed state, its NamedShardings). No full copy ever lives on one device.
    compiler_options: extra XLA options for this compilation (as in `jax.jit`).
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, rules, param_specs=param_specs)
    init = jax.jit(
        lambda *a: unbox(init_fn(*a)), out_shardings=shardings, compiler_options=compiler_options
    )
    state = init(*args)
    return state, shardings


def put_sharded(tree: Any, shardings: Any) -> Any:
    """Places a host (numpy) or device pytree, e.g. `from_hf` params, on the mesh.

    Always a fresh copy (never aliases `tree`), so the result may be donated while `tree`
    lives on, e.g. as the reference. Multi-host: every process passes the same values."""
    return jax.device_put(unbox(tree), shardings, may_alias=False)


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch or packed-row) dim over ("data", "fsdp"), other dims whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _named_items(tree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), x) for path, x in flat]


def shard_batch(local_batch: Mapping[str, np.ndarray] | Any, mesh: Mesh) -> Any:
    """Global batch arrays from this process's part of the batch.

    local_batch: pytree (usually a dict) of numpy arrays whose leading dim is this process's
      share of the global batch: [B / num_processes, ...]. With one process that is the
      whole batch. Every process must call this with the same structure and shapes.
    Returns jax Arrays of shape [B, ...] sharded by `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    # Shards of the leading dim that this process holds, i.e. what its slice must divide by.
    index_map = sharding.addressable_devices_indices_map((mesh.size,))
    local_shards = len({(idx[0].start, idx[0].stop) for idx in index_map.values()})
    for name, x in _named_items(local_batch):
        if np.ndim(x) == 0 or np.shape(x)[0] % local_shards:
            raise ValueError(
                f"shard_batch: field {name} has shape {np.shape(x)}; its leading (batch) dim "
                f"must divide by the {local_shards} batch shards of this process (mesh "
                f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}, "
                f"{jax.process_count()} process(es))"
            )
    return jax.make_array_from_process_local_data(sharding, local_batch)


# ------------------------------------------------------------------------------------------
# The jitted step
# ------------------------------------------------------------------------------------------


def jit_step(
    step_fn: Callable[[Any, Any, Any], tuple[Any, Any]],
    mesh: Mesh,
    state_shardings: Any,
    reference_shardings: Any,
    batch_sharding: NamedSharding,
    *,
    rules: Rules = DEFAULT_RULES,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """`step_fn(state, batch, reference) -> (state, metrics)` compiled once for `mesh`.

    The state is donated (updated in place); the reference is not (it is reused every
    step). Metrics come back replicated. Each call runs inside `jax.set_mesh(mesh)` and
    `nn.logical_axis_rules(rules)`, so the models' logical activation constraints
    (act_batch, act_heads, ...) bind to the mesh when the step is traced.
    reference_shardings: None when the reference is None (cached logps / reference-free).
    compiler_options: extra XLA options for this compilation (as in `jax.jit`), e.g. GPU/TPU
      scheduler flags.
    """
    rules = check_rules(rules, mesh)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding, reference_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )

    def step(state, batch, reference):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch, reference)

    def lower(state, batch, reference):
        """`jax.stages.Lowered` of the step (HLO text, memory and cost analysis)."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(state, batch, reference)

    step.lower = lower
    return step


# ------------------------------------------------------------------------------------------
# The pmap path
# ------------------------------------------------------------------------------------------


def pmap_step(
    step_fn: Callable[[Any, Any, Any], tuple[Any, Any]], *, axis_name: str = PMAP_AXIS
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """Data-parallel step over the local devices (`jax.pmap`, now built on shard_map).

    step_fn must average its gradients (and metrics) with `lax.pmean(..., axis_name)`:
    build it with the step factory's `axis_name=axis_name`.
    Args of the returned function: state and reference from `replicate`, batch from
    `shard_batch_pmap`; every leaf carries a leading [n_dev] axis. The state is donated.
    """
    return jax.pmap(step_fn, axis_name=axis_name, donate_argnums=(0,))


def _local_device_sharding(axis_name: str) -> NamedSharding:
    local = Mesh(np.array(jax.local_devices()), (axis_name,))
    return NamedSharding(local, P(axis_name))


def replicate(tree: Any, *, axis_name: str = PMAP_AXIS) -> Any:
    """One copy of `tree` per local device, stacked on a new leading axis [n_dev, ...].

    Broadcast under jit straight into the per-device layout, so no device holds n_dev
    copies (the replacement for the deprecated `jax.device_put_replicated`)."""
    n = jax.local_device_count()
    sharding = _local_device_sharding(axis_name)
    tree = unbox(tree)
    return jax.jit(
        lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), t),
        out_shardings=sharding,
    )(tree)


def unreplicate(tree: Any) -> Any:
    """The copy on the first local device of a `replicate`d (or pmap output) tree."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch_pmap(local_batch: Any, *, axis_name: str = PMAP_AXIS) -> Any:
    """Splits this process's batch [B_local, ...] into [n_dev, B_local / n_dev, ...] on the
    local devices, for `pmap_step`."""
    n = jax.local_device_count()
    for name, x in _named_items(local_batch):
        if np.ndim(x) == 0 or np.shape(x)[0] % n:
            raise ValueError(
                f"shard_batch_pmap: field {name} has shape {np.shape(x)}; its leading (batch) "
                f"dim must divide by the {n} local devices"
            )
    split = jax.tree.map(lambda x: np.reshape(x, (n, -1, *np.shape(x)[1:])), local_batch)
    return jax.device_put(split, _local_device_sharding(axis_name))


# ------------------------------------------------------------------------------------------
# Multi-host
# ------------------------------------------------------------------------------------------

ENV_COORDINATOR = "DPO_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DPO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DPO_JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
    cpu_collectives: str = "gloo",
) -> bool:
    """Joins this process to a multi-process JAX run; returns whether it is one.

    Must run before anything touches a JAX device. Sources, in order: the arguments (from
    command-line flags), then the environment variables DPO_JAX_COORDINATOR_ADDRESS,
    DPO_JAX_NUM_PROCESSES, DPO_JAX_PROCESS_ID (and JAX's own JAX_COORDINATOR_ADDRESS).
    With none of them, `auto_detect=True` lets JAX detect a cluster (Cloud TPU, Slurm,
    Open MPI, Kubernetes); otherwise this is a no-op for the usual single-process run.
    cpu_collectives: cross-process collectives on CPU hosts ("gloo" or "mpi").
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = (
        coordinator_address
        or os.environ.get(ENV_COORDINATOR)
        or os.environ.get("JAX_COORDINATOR_ADDRESS")
    )
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator_address is None and num_processes is None and process_id is None:
        if not auto_detect:
            return False
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize()
        return True
    if num_processes == 1:
        return False
    missing = [
        name
        for name, value in (
            ("coordinator_address", coordinator_address),
            ("num_processes", num_processes),
            ("process_id", process_id),
        )
        if value is None
    ]
    if missing and not auto_detect:
        raise ValueError(
            f"initialize_distributed: {missing} not given; pass all of coordinator_address, "
            f"num_processes, process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
            f"{ENV_PROCESS_ID}), or enable auto_detect on a supported cluster"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize_distributed: process_id={process_id} not in [0, {num_processes})"
        )
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True
