"""Two local processes (jax.distributed over 127.0.0.1, gloo collectives, 2 fake CPU
devices each) train like one process: each feeds its half of every global batch through
`parallel.shard_batch`, the mesh spans both processes' devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import parallel_testlib as lib
import pytest

from dpo_jax import parallel

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    # fsdp=2 spans the two processes (params and batch split across them), tensor=2 the
    # two devices of each.
    mesh_shape = "1,2,2"
    out = tmp_path / "process0.npz"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_PLATFORMS="cpu",
            DPO_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            DPO_JAX_NUM_PROCESSES="2",
            DPO_JAX_PROCESS_ID=str(rank),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), mesh_shape, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        # The single-process run, while the workers start up.
        batches = [lib.make_batch(seed) for seed in range(3)]
        want_losses, want_params = lib.run_jit(
            parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), batches
        )
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {rank} failed:\n{log[-4000:]}"

    got = np.load(out)
    np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-5)
    flat, _ = jax.tree_util.tree_flatten_with_path(want_params)
    assert set(got.files) == {"losses"} | {jax.tree_util.keystr(path) for path, _ in flat}
    for path, want in flat:
        np.testing.assert_allclose(
            got[jax.tree_util.keystr(path)], want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
        )
