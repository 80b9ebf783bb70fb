"""config.dpo.reference = "cached": reference sums computed once, same run as a frozen reference.

A tiny DPO run with cached reference log-probs must give the per-step losses, held-out
metrics and final params of the same run with the frozen reference params, and a resumed
run must read the cached sums back from the workdir instead of recomputing them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from test_loop import exported, load_config, read_metrics

from dpo_jax.train import inputs, loop, reference_cache


def _config(reference: str, steps: int = 4, mode: str = "jit"):
    config = load_config("dpo")
    with config.unlocked():
        config.dpo.reference = reference
        config.dpo.steps = steps
        config.parallel.mode = mode
        config.export_hf = True
    return config


def _losses(metrics, key="loss"):
    return [(r["step"], r[key]) for r in metrics if key in r]


@pytest.fixture(scope="module")
def params_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("params"))
    loop.run(_config("params"), workdir)
    return workdir


def test_cached_reference_matches_frozen_reference_params(params_run, tmp_path):
    workdir = str(tmp_path / "cached")
    loop.run(_config("cached"), workdir)
    want, got = read_metrics(params_run), read_metrics(workdir)
    for key in ("loss", "eval/loss", "eval/rewards/margins", "eval/rewards/chosen"):
        w_steps, w = zip(*_losses(want, key), strict=True)
        g_steps, g = zip(*_losses(got, key), strict=True)
        assert w_steps == g_steps and len(w_steps) >= 2, key
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=key)
    want_params, got_params = exported(params_run), exported(workdir)
    assert want_params.keys() == got_params.keys()
    for name in want_params:
        np.testing.assert_allclose(got_params[name], want_params[name], rtol=1e-5, atol=1e-6)
    # The cache covers every train and held-out pair, in record order, nonzero.
    ckpt = os.path.join(workdir, "checkpoints", "dpo")
    splits = inputs.load_splits(_config("cached"), workdir)
    train = np.load(os.path.join(ckpt, "ref_logps.npy"))
    held_out = np.load(os.path.join(ckpt, "eval_ref_logps.npy"))
    assert train.shape == (len(splits.pairs), 2) and held_out.shape == (len(splits.eval_pairs), 2)
    assert (train < 0).all() and (held_out < 0).all()


def test_resume_reuses_the_cached_file_and_continues_exactly(params_run, tmp_path, monkeypatch):
    # Under pmap (the cache is computed by pmapped replicas), against the jit params run.
    workdir = str(tmp_path / "resume")
    loop.run(_config("cached", steps=2, mode="pmap"), workdir)
    path = os.path.join(workdir, "checkpoints", "dpo", "ref_logps.npy")
    assert os.path.exists(path) and not os.path.exists(path + ".tmp")

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached reference log-probs were recomputed on resume")

    monkeypatch.setattr(reference_cache, "scoring_batches", no_recompute)
    # Resumes at step 2 of 4 (more steps is another run: allowed explicitly).
    loop.run(_config("cached", steps=4, mode="pmap"), workdir, allow_config_change=True)
    got = dict(_losses(read_metrics(workdir)))
    want = dict(_losses(read_metrics(params_run)))
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                               rtol=1e-5)  # fmt: skip


def test_a_stale_cache_from_other_params_and_data_is_recomputed(tmp_path, caplog):
    # A cache of the same shape, computed from another seed's data and init, sits in the
    # checkpoint directory: it must not be reused (the step-1 loss would not be log 2).
    other = str(tmp_path / "other")
    config = _config("cached", steps=1)
    with config.unlocked():
        config.seed = 1
    loop.run(config, other)
    workdir = str(tmp_path / "stale")
    target = os.path.join(workdir, "checkpoints", "dpo")
    shutil.copytree(os.path.join(other, "checkpoints", "dpo"), target)
    for name in os.listdir(target):
        if name.isdigit():  # keep the cache files only, not the other run's checkpoints
            shutil.rmtree(os.path.join(target, name))
    stale = np.load(os.path.join(target, "ref_logps.npy"))
    loop.run(_config("cached", steps=1), workdir)
    assert "recomputing them" in caplog.text
    fresh = np.load(os.path.join(target, "ref_logps.npy"))
    assert fresh.shape == stale.shape and not np.allclose(fresh, stale)
    first = [r for r in read_metrics(workdir) if r["stage"] == "dpo" and "loss" in r][0]
    np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-5)
