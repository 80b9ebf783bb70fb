"""Where a run's arrays live and how its steps execute: a sharded mesh ("jit") or pmap.

`Devices` places params, train states, the frozen reference and batches, compiles the
train, eval and scoring functions for the chosen mode, and converts states to and from
their one-copy checkpoint form. `all_process_states` gathers every process's JSON
data-iterator state for the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax import parallel
from dpo_jax.train.checkpoints import abstract_like
from dpo_jax.train.state import state_from_params

# ------------------------------------------------------------------------------------------
# Devices: where state lives and how a step runs (a sharded mesh, or pmap replicas)
# ------------------------------------------------------------------------------------------


class Devices:
    """Placement of params, states and batches for `parallel.mode` "jit" or "pmap".

    jit: one program over a ("data", "fsdp", "tensor") mesh; params and optimizer state
      sharded by the logical-axis rules, the reference by its own rules.
    pmap: every local device holds a replica (leading [n_dev] axis); checkpoints hold one
      copy, so a run may switch between the modes on resume.
    """

    def __init__(self, config: ml_collections.ConfigDict, model, example_tokens):
        p = config.parallel
        self.mode = p.mode
        if self.mode not in ("jit", "pmap"):
            raise ValueError(f"config.parallel.mode must be 'jit' or 'pmap', got {p.mode!r}")
        self.model = model
        abstract = jax.eval_shape(model.init, jax.random.key(0), example_tokens)["params"]
        self.param_specs = parallel.param_logical_specs(abstract)
        self.abstract_params = parallel.unbox(abstract)
        if self.mode == "pmap":
            self.mesh = None
            self.shards = jax.local_device_count()
            return
        self.mesh = parallel.make_mesh(tuple(p.mesh_shape))
        self.rules = parallel.check_rules(p.logical_axis_rules, self.mesh)
        if p.reference_rules not in parallel.REFERENCE_RULES:
            raise ValueError(
                f"config.parallel.reference_rules={p.reference_rules!r}; expected one of "
                f"{sorted(parallel.REFERENCE_RULES)}"
            )
        self.reference_rules = parallel.REFERENCE_RULES[p.reference_rules]
        self.param_shardings = self._shardings(self.abstract_params, self.rules)
        self.shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"] // jax.process_count()

    def _shardings(self, abstract, rules):
        return parallel.state_shardings(abstract, self.mesh, rules, param_specs=self.param_specs)

    def initial_params(self, host_params, seed: int):
        """Params on devices: `host_params` (e.g. from_hf), or a random init from `seed`
        (created sharded under "jit": no full copy on one device)."""
        if host_params is None:
            rng = jax.random.key(seed)
            init = lambda rng: self.model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]  # noqa: E731
            if self.mode == "pmap":
                return jax.jit(lambda rng: parallel.unbox(init(rng)))(rng)
            return parallel.init_sharded(init, rng, mesh=self.mesh, rules=self.rules)[0]
        if self.mode == "pmap":
            return jax.device_put(host_params)
        return parallel.put_sharded(host_params, self.param_shardings)

    def reference(self, params):
        """The frozen reference: a placement of `params` that no step ever donates."""
        if self.mode == "pmap":
            return parallel.replicate(params)
        return jax.device_put(params, self._shardings(self.abstract_params, self.reference_rules))

    def new_state(self, params, tx, rng, param_specs=None):
        """A step-0 TrainState around a *copy* of `params` (the state is donated each step,
        `params` may still be needed, e.g. as the reference). param_specs: logical specs of
        `params` when they are not the model's (LoRA adapters: `lora.adapter_specs`)."""

        def init(p, key):
            return state_from_params(jax.tree.map(jnp.copy, p), tx, key)

        if self.mode == "pmap":
            return parallel.replicate(jax.jit(init)(params, rng))
        specs = self.param_specs if param_specs is None else param_specs
        state, self.state_shardings = parallel.init_sharded(
            init, params, rng, mesh=self.mesh, rules=self.rules, param_specs=specs
        )
        return state

    def compile(self, step_fn, reference) -> Callable:
        """`step(state, local_batch_np) -> (state, host-ready metrics)`."""
        if self.mode == "pmap":
            run = parallel.pmap_step(step_fn)
            return lambda state, local: first_replica(
                run(state, parallel.shard_batch_pmap(local), reference)
            )
        ref_shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference)
        run = parallel.jit_step(step_fn, self.mesh, self.state_shardings, ref_shardings,
                                parallel.batch_sharding(self.mesh), rules=self.rules)  # fmt: skip
        return lambda state, local: run(state, parallel.shard_batch(local, self.mesh), reference)

    def compile_eval(self, eval_fn, reference) -> Callable:
        """`evaluate(params, local_batch_np) -> metrics` (params as the state holds them)."""
        if self.mode == "pmap":
            run = jax.pmap(eval_fn, axis_name=parallel.PMAP_AXIS)
            return lambda params, local: jax.tree.map(
                lambda x: x[0], run(params, parallel.shard_batch_pmap(local), reference)
            )
        replicated = NamedSharding(self.mesh, P())
        ref_shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference)
        run = jax.jit(
            eval_fn,
            in_shardings=(
                self.state_shardings.params,
                parallel.batch_sharding(self.mesh),
                ref_shardings,
            ),  # fmt: skip
            out_shardings=replicated,
        )

        def evaluate(params, local):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                return run(params, parallel.shard_batch(local, self.mesh), reference)

        return evaluate

    def compile_scoring(self, score_fn, params) -> Callable:
        """`score(local_batch_np, record_indices [B_local]) -> (out [B_global, ...],
        record_indices [B_global])` as numpy on every process, `score_fn(params, batch)`
        run where the steps run; `params` as `initial_params` places them (one copy)."""
        if self.mode == "pmap":
            replicas = parallel.replicate(params)
            run = jax.pmap(score_fn, axis_name=parallel.PMAP_AXIS)

            def score_pmap(local, indices):
                out = np.asarray(run(replicas, parallel.shard_batch_pmap(local)))
                out = out.reshape(-1, *out.shape[2:])  # [n_dev, B/n_dev, ...] -> local order
                if jax.process_count() > 1:
                    out, indices = multihost_utils.process_allgather((out, indices))
                    out, indices = out.reshape(-1, *out.shape[2:]), indices.reshape(-1)
                return out, np.asarray(indices)

            return score_pmap
        replicated = NamedSharding(self.mesh, P())
        batch_sharding = parallel.batch_sharding(self.mesh)
        # The record indices travel through the same batch sharding as the batch, so the
        # global result rows and their indices line up whatever the process layout.
        run = jax.jit(
            lambda p, batch, indices: (score_fn(p, batch), indices),
            in_shardings=(
                jax.tree.map(lambda x: x.sharding, params),
                batch_sharding,
                batch_sharding,
            ),  # fmt: skip
            out_shardings=replicated,
        )

        def score(local, indices):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                out = run(params, parallel.shard_batch(local, self.mesh),
                          parallel.shard_batch(indices, self.mesh))  # fmt: skip
            return tuple(np.asarray(x.addressable_data(0)) for x in out)

        return score

    def to_checkpoint(self, state):
        """One copy of a state: pmap's replicas -> one array (with several processes, a
        global array replicated on every process's devices: orbax and `process_allgather`
        refuse or concatenate the process-local copies)."""
        if self.mode != "pmap":
            return state
        if jax.process_count() == 1:
            return parallel.unreplicate(state)
        replicated = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), P())
        return jax.tree.map(
            lambda x: jax.make_array_from_single_device_arrays(
                x.shape[1:], replicated, [s.data[0] for s in x.addressable_shards]
            ),
            state,
        )

    def checkpoint_target(self, state):
        return abstract_like(self.to_checkpoint(state))

    def from_checkpoint(self, state):
        if self.mode != "pmap":
            return state
        if jax.process_count() > 1:  # via the host: global arrays -> this process's devices
            state = jax.device_get(state)
        return parallel.replicate(state)

    def params_of(self, state):
        """The policy params of a state, one copy (for the next stage and for export)."""
        return self.to_checkpoint(state).params


def first_replica(out):
    """pmap output -> (state, metrics of replica 0): metrics are pmean'ed, so all agree."""
    state, metrics = out
    return state, jax.tree.map(lambda x: x[0], metrics)


# ------------------------------------------------------------------------------------------
# Multi-process data-iterator state
# ------------------------------------------------------------------------------------------


def all_process_states(local_state: dict) -> list[dict]:
    """Every process's iterator state (they differ: each reads its own shard)."""
    if jax.process_count() == 1:
        return [local_state]
    encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([encoded.size]))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)]).decode())
        for row, n in zip(rows, sizes.ravel(), strict=True)
    ]
