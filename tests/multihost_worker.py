"""One process of the 2-process test (test_multihost.py); not a test module itself.

    DPO_JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT DPO_JAX_NUM_PROCESSES=2 DPO_JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python tests/multihost_worker.py MESH_SHAPE OUT.npz

Joins the run through `parallel.initialize_distributed()` (environment variables), trains
the tiny model a few DPO steps on a mesh over all processes' devices, feeding only this
process's half of every global batch through `parallel.shard_batch`, and (process 0)
writes the losses and the gathered final params to OUT.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dpo_jax import parallel  # noqa: E402

# Before anything touches a device.
parallel.initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import parallel_testlib as lib  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

STEPS = 3


def main(mesh_shape: str, out: str) -> None:
    assert jax.process_count() == 2, jax.process_count()
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


if __name__ == "__main__":
    main(*sys.argv[1:])
