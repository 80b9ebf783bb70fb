"""One process of the 2-process tests (test_multihost.py); not a test module itself.

    DPO_JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT DPO_JAX_NUM_PROCESSES=2 DPO_JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python tests/multihost_worker.py step MESH_SHAPE OUT.npz
    ... python tests/multihost_worker.py loop WORKDIR CASE [CASE ...]

Joins the run through `parallel.initialize_distributed()` (environment variables), then

- `step`: trains the tiny model a few DPO steps (the bare step) on a mesh over all
  processes' devices, feeding only this process's half of every global batch through
  `parallel.shard_batch`, and (process 0) writes the losses and the gathered final params
  to OUT.npz;
- `loop`: runs the whole training job (`train.loop.run`) of each CASE of `CASES` in
  WORKDIR/CASE, a workdir shared by both processes as on a pod's shared filesystem (the
  cases of `RESUME_AT` stopped part way and resumed).
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import parallel_testlib as lib  # noqa: E402

from dpo_jax import parallel  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

STEPS = 3
CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dpo.py"
)

# configs/dpo.py:tiny runs of STEPS steps (held-out evaluation at steps 0 and 3,
# checkpoints at 2 and 3, the final policy exported): each case is the same config in 1
# process and in 2, which must agree. SGD with momentum, not the config's RMSprop, whose
# sign-like first steps turn rounding differences of reduction order (8 devices in one
# process, 2 x 2 here) into lr-sized parameter differences (as in parallel_testlib).
COMMON = {
    "dpo.steps": STEPS,
    "export_hf": True,
    "dpo.optimizer.name": "sgd",
    "dpo.optimizer.learning_rate": 0.5,
    "dpo.optimizer.momentum": 0.9,
}
CASES = {
    # Reference sums scored once by both processes' shards (each scores its own records,
    # all gathered in record order), train and held-out pairs; params FSDP-sharded across
    # the processes.
    "cached": {
        "dpo.reference": "cached",
        "parallel.mode": "jit",
        "parallel.mesh_shape": (1, -1, 1),
    },
    # Replicas on every local device of every process; the frozen reference replicated too.
    "pmap": {"dpo.reference": "params", "parallel.mode": "pmap"},
}
# Cases whose 2-process run stops after this many steps and resumes (from its checkpoint:
# one copy of the replicated state, written and read by both processes) to STEPS.
RESUME_AT = {"pmap": 2}


def loop_config(case: str):
    """configs/dpo.py:tiny with the COMMON and the case's overrides."""
    spec = importlib.util.spec_from_file_location("dpo_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    with config.unlocked():
        for field, value in {**COMMON, **CASES[case]}.items():
            *path, name = field.split(".")
            section = config
            for key in path:
                section = section[key]
            section[name] = value
    return config


def run_steps(mesh_shape: str, out: str) -> None:
    mesh = parallel.make_mesh(tuple(int(s) for s in mesh_shape.split(",")))
    rank, share = jax.process_index(), lib.NUM_PAIRS // jax.process_count()
    local = [
        {k: v[rank * share : (rank + 1) * share] for k, v in lib.make_batch(seed).items()}
        for seed in range(STEPS)
    ]
    losses, params = lib.run_jit(mesh, local)
    if rank == 0:
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        arrays = {jax.tree_util.keystr(path): x for path, x in flat}
        np.savez(out, losses=losses, **arrays)


def run_loops(workdir: str, *cases: str) -> None:
    from dpo_jax.train import loop

    for case in cases:
        config, where = loop_config(case), os.path.join(workdir, case)
        if case in RESUME_AT:
            with config.unlocked():
                config.dpo.steps = RESUME_AT[case]
            loop.run(config, where)
            config = loop_config(case)
        loop.run(config, where, allow_config_change=case in RESUME_AT)


if __name__ == "__main__":
    # Before anything touches a device.
    parallel.initialize_distributed()
    assert jax.process_count() == 2, jax.process_count()
    what, *args = sys.argv[1:]
    {"step": run_steps, "loop": run_loops}[what](*args)
