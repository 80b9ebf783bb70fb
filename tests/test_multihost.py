"""Two local processes (jax.distributed over 127.0.0.1, gloo collectives, 2 fake CPU
devices each) train like one process: each feeds its half of every global batch (through
`parallel.shard_batch`, or `shard_batch_pmap` under pmap), the mesh spans both processes'
devices.

The bare DPO step on a mesh, then the whole job (`train.loop.run`, configs/dpo.py:tiny) with
cached reference log-probs and with pmap (stopped and resumed in 2 processes): per-step
losses, held-out metrics, the exported policy and the cached sums must equal those of the
same run in one process (this pytest process, 8 fake devices).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import parallel_testlib as lib
import pytest
from multihost_worker import CASES, RESUME_AT, loop_config
from test_loop import exported, read_metrics

from dpo_jax import parallel
from dpo_jax.train import loop

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> list[subprocess.Popen]:
    """Starts the two worker processes of one jax.distributed run."""
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
                [sys.executable, str(WORKER), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Waits for both workers (killing them on timeout or error) and checks they succeeded."""
    try:
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {rank} failed:\n{log[-4000:]}"


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    # fsdp=2 spans the two processes (params and batch split across them), tensor=2 the
    # two devices of each.
    out = tmp_path / "process0.npz"
    procs = _launch("step", "1,2,2", str(out))
    try:
        # The single-process run, while the workers start up.
        batches = [lib.make_batch(seed) for seed in range(3)]
        want_losses, want_params = lib.run_jit(
            parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), batches
        )
    finally:
        _wait(procs, TIMEOUT_S)

    got = np.load(out)
    np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-5)
    flat, _ = jax.tree_util.tree_flatten_with_path(want_params)
    assert set(got.files) == {"losses"} | {jax.tree_util.keystr(path) for path, _ in flat}
    for path, want in flat:
        np.testing.assert_allclose(
            got[jax.tree_util.keystr(path)], want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
        )


# ------------------------------------------------------------------------------------------
# The whole job: cached reference, pmap
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    """{case: (one-process workdir, two-process workdir)} for every case of CASES; the
    two workers run all cases in turn, while this process runs them alone."""
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    procs = _launch("loop", str(two), *CASES)
    try:
        for case in CASES:
            loop.run(loop_config(case), str(one / case))
    finally:
        _wait(procs, 2 * TIMEOUT_S)
    return {case: (str(one / case), str(two / case)) for case in CASES}


def _by_step(metrics, prefix):
    """{step: {key: value}} of the DPO stage's records with keys starting with `prefix`
    (the loss, held-out metrics); timing and this-process-only keys are left out."""
    out = {}
    for r in metrics:
        if r["stage"] == "dpo":
            picked = {k: v for k, v in r.items() if k.startswith(prefix)}
            if picked:
                out.setdefault(r["step"], {}).update(picked)
    return out


def _assert_same_run(one: str, two: str) -> None:
    want, got = read_metrics(one), read_metrics(two)
    losses = [(_by_step(m, "loss")) for m in (want, got)]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3]
    for step, values in losses[0].items():
        np.testing.assert_allclose(losses[1][step]["loss"], values["loss"], rtol=1e-5)
    evals = [_by_step(m, "eval/") for m in (want, got)]
    # (A resumed run also evaluated where it stopped.)
    assert sorted(evals[0]) == [0, 3] and set(evals[0]) <= set(evals[1])
    for step, values in evals[0].items():
        assert evals[1][step].keys() == values.keys()
        assert values["eval/pairs"] == 64, "every held-out pair evaluated"
        for key, value in values.items():
            np.testing.assert_allclose(
                evals[1][step][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{key} at step {step}"
            )
    want_params, got_params = exported(one), exported(two)
    assert want_params.keys() == got_params.keys()
    for name, value in want_params.items():
        np.testing.assert_allclose(got_params[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_cached_reference_two_processes_match_one_process(loop_runs):
    one, two = loop_runs["cached"]
    _assert_same_run(one, two)
    # The cached sums: scored by both processes, each its own records, gathered in order.
    for name in ("ref_logps.npy", "eval_ref_logps.npy"):
        want, got = (np.load(os.path.join(w, "checkpoints", "dpo", name)) for w in (one, two))
        assert got.shape == want.shape and (want < 0).all(), name
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_pmap_two_processes_match_one_process(loop_runs):
    one, two = loop_runs["pmap"]
    # The two processes stopped (and evaluated) at RESUME_AT, then resumed from there.
    assert RESUME_AT["pmap"] in _by_step(read_metrics(two), "eval/")
    _assert_same_run(one, two)
