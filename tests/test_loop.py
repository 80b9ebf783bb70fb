"""The main job end to end: configs, stages, checkpoints, exact resume, modes, export.

Runs use the configs' own `:tiny` variants (seconds each) on the 8 fake CPU devices of
tests/conftest.py, in process where possible and as real `python -m dpo_jax.main`
subprocesses for the kill -9 test.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from dpo_jax import main as main_lib
from dpo_jax.train import loop
from dpo_jax.train.checkpoints import StageCheckpointer
from dpo_jax.train.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training configs (configs/evaluate.py configures `dpo_jax.evaluate`: tests/test_evaluate.py).
# Training configs (`python -m dpo_jax.main`). evaluate.py configures dpo_jax.evaluate and
# sentiment.py the experiments/sentiment driver: their own tests load them.
OTHER_ENTRY_POINTS = ("evaluate.py", "sentiment.py")
CONFIG_FILES = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(p) not in OTHER_ENTRY_POINTS
)


def load_config(name: str, arg: str | None = "tiny"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def exported(workdir) -> dict[str, np.ndarray]:
    return load_file(os.path.join(workdir, "hf", "model.safetensors"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_has_a_launch_command_and_a_tiny_mode(path):
    name = os.path.basename(path)[:-3]
    with open(path) as f:
        source = f.read()
    assert f"--config=configs/{name}.py" in source, "the docstring must hold the launch command"
    full, tiny = load_config(name, None), load_config(name, "tiny")
    assert full.is_locked and tiny.is_locked
    assert tiny.data.synthetic and tiny.model.preset == "tiny"
    assert tiny.dpo.steps <= 6 and tiny.sft.steps <= 6
    assert set(full.stages) <= set(loop.STAGES)
    validate(tiny)


def test_sweep_overrides_are_applied_and_checked():
    config = load_config("dpo", None)
    assert len(config.sweep) > 1
    member = main_lib.apply_overrides(config, dict(config.sweep[0]))
    assert member.dpo.loss.beta == config.sweep[0]["dpo.loss.beta"]
    assert config.dpo.loss.beta == 0.1  # the original is untouched
    with pytest.raises(KeyError, match="no_such_field"):
        main_lib.apply_overrides(config, {"dpo.loss.no_such_field": 1})


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """One uninterrupted quickstart:tiny run (SFT then DPO), shared by several tests."""
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    loop.run(load_config("quickstart"), workdir)
    return workdir


def test_quickstart_writes_everything_a_run_promises(quickstart_run):
    workdir = quickstart_run
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["dpo"]["loss"]["name"] == "sigmoid"
    records = read_metrics(workdir)
    for stage, steps in (("sft", 6), ("dpo", 6)):
        train = [r for r in records if r["stage"] == stage and "loss" in r]
        assert [r["step"] for r in train] == list(range(1, steps + 1))
        assert all(np.isfinite(r["loss"]) and r["nonfinite_steps_total"] == 0 for r in train)
        # Toy sequences are shorter than the padded length 32: some padding, never all.
        assert all(0 < r["padding_fraction"] < 1 for r in train)
    evals = [r for r in records if r["stage"] == "dpo" and "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    # At step 0 the policy is the reference: DPO loss log 2, zero rewards.
    assert evals[0]["eval/loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert evals[0]["eval/rewards/margins"] == 0.0
    assert 0.0 <= evals[0]["eval/logps/accuracies"] <= 1.0
    assert evals[0]["eval/pairs"] == 64 and evals[0]["eval/tokens"] > 64 * 2
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["dpo", "sft"]
    assert "reward accuracy" in loop.summarize(workdir)


def test_exported_policy_loads_in_transformers_with_our_logits(quickstart_run):
    import torch
    import transformers

    from dpo_jax import models

    hf_dir = os.path.join(quickstart_run, "hf")
    model, params = models.from_hf(hf_dir)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = np.array([[1, 5, 9, 13, 40, 41, 2]], np.int32)
    ours = np.asarray(model.apply({"params": params}, tokens))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.eos_token is not None


def test_rerun_of_a_finished_run_changes_nothing(quickstart_run):
    before = exported(quickstart_run)
    n_records = len(read_metrics(quickstart_run))
    loop.run(load_config("quickstart"), quickstart_run)
    after = exported(quickstart_run)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert len(read_metrics(quickstart_run)) == n_records


def test_corrupted_latest_checkpoint_falls_back_and_resumes_exactly(
    quickstart_run, tmp_path, caplog
):
    """Copy the finished run, break its newest DPO checkpoint, rerun: the run resumes from
    the previous checkpoint (with a warning) and ends with bitwise the same policy."""
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(quickstart_run, workdir)
    shutil.rmtree(os.path.join(workdir, "hf"))
    newest = os.path.join(workdir, "checkpoints", "dpo", "6")
    for path in glob.glob(os.path.join(newest, "state", "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"corrupted")
    with caplog.at_level(logging.WARNING):
        loop.run(load_config("quickstart"), workdir)
    assert any("unreadable" in r.message and "falling back" in r.message for r in caplog.records)
    reference, resumed = exported(quickstart_run), exported(workdir)
    assert reference.keys() == resumed.keys()
    for name in reference:
        np.testing.assert_array_equal(reference[name], resumed[name], err_msg=name)
    # The steps redone after the fallback are logged once, not twice.
    dpo_steps = [r["step"] for r in read_metrics(workdir) if r["stage"] == "dpo" and "loss" in r]
    assert dpo_steps == list(range(1, 7))


def test_checkpointer_skips_unreadable_steps(tmp_path, caplog):
    import jax.numpy as jnp

    from dpo_jax.train.checkpoints import abstract_like

    checkpointer = StageCheckpointer(str(tmp_path / "ckpt"), keep=3, async_save=False)
    tree = {"w": jnp.arange(4.0)}
    for step in (1, 2, 3):
        checkpointer.save(step, {"w": tree["w"] * step}, {"position": step})
    checkpointer.wait()
    for step in (3, 2):
        for path in glob.glob(str(tmp_path / "ckpt" / str(step) / "data" / "*")):
            with open(path, "w") as f:
                f.write("{not json")
    with caplog.at_level(logging.WARNING):
        step, state, data = checkpointer.restore_latest(abstract_like(tree))
    assert step == 1 and data == {"position": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(4.0))
    assert sum("falling back" in r.message for r in caplog.records) == 2
    # The unreadable steps are set aside (not deleted), so steps 2 and 3 can be saved anew.
    assert checkpointer.all_steps() == [1]
    assert len(os.listdir(tmp_path / "ckpt" / "unreadable")) == 2
    checkpointer.close()


def test_pmap_mode_matches_jit_mode(tmp_path):
    """The same DPO run under parallel.mode=jit (mesh 8x1x1) and pmap (8 replicas)."""
    results = {}
    for mode in ("jit", "pmap"):
        config = load_config("dpo")
        with config.unlocked():
            config.parallel.mode = mode
            config.export_hf = True
        workdir = str(tmp_path / mode)
        loop.run(config, workdir)
        results[mode] = (exported(workdir), read_metrics(workdir))
    (jit_params, jit_metrics), (pmap_params, pmap_metrics) = results["jit"], results["pmap"]
    for name in jit_params:
        np.testing.assert_allclose(jit_params[name], pmap_params[name], rtol=1e-5, atol=1e-6)
    jit_losses = [r["loss"] for r in jit_metrics if "loss" in r]
    pmap_losses = [r["loss"] for r in pmap_metrics if "loss" in r]
    np.testing.assert_allclose(jit_losses, pmap_losses, rtol=1e-5)


@pytest.mark.slow
def test_kill_at_a_random_step_then_rerun_is_bitwise_exact(quickstart_run, tmp_path):
    """`kill -9` the real command at a random moment, rerun the same command: the final
    policy equals the uninterrupted run's bit for bit."""
    seed = random.randrange(10**6)
    kill_after_records = random.Random(seed).randint(1, 14)
    workdir = str(tmp_path / "killed")
    command = [sys.executable, "-m", "dpo_jax.main",
               "--config=" + os.path.join(ROOT, "configs", "quickstart.py") + ":tiny",
               "--workdir=" + workdir]  # fmt: skip
    # The same XLA flags (inherited) and matmul precision as this process (conftest.py).
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                if sum(1 for _ in f) >= kill_after_records:
                    proc.send_signal(signal.SIGKILL)
                    break
        time.sleep(0.05)
    proc.wait()
    subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
    reference, resumed = exported(quickstart_run), exported(workdir)
    for name in reference:
        np.testing.assert_array_equal(
            reference[name], resumed[name], err_msg=f"{name} (kill seed {seed})"
        )


def test_nonfinite_steps_keep_params_and_are_counted(tmp_path, monkeypatch):
    """Batches 3 and 4 of a DPO run carry a token id outside the vocabulary (NaN log-probs):
    both updates are skipped, counted and logged, and the run goes on."""
    from dpo_jax.train import inputs

    real_train_iterator = inputs.train_iterator

    def poisoned(*args, **kwargs):
        iterator = real_train_iterator(*args, **kwargs)
        real_next = iterator.__next__
        calls = {"n": 0}

        def next_batch():
            batch = real_next()
            calls["n"] += 1
            if calls["n"] in (3, 4):
                batch = dict(batch, tokens=np.where(batch["loss_mask"] == 1, 10**6,
                                                    batch["tokens"]).astype(np.int32))  # fmt: skip
            return batch

        return _Wrapped(iterator, next_batch)

    monkeypatch.setattr(inputs, "train_iterator", poisoned)
    config = load_config("dpo")
    with config.unlocked():
        config.checkpoint.keep = 10
    workdir = str(tmp_path / "run")
    loop.run(config, workdir)
    records = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 0, 0]
    assert [r["nonfinite_steps_total"] for r in records] == [0, 0, 1, 2, 2, 2]
    checkpointer = StageCheckpointer(os.path.join(workdir, "checkpoints", "dpo"))
    assert checkpointer.all_steps() == [2, 4, 6]
    params = {}
    for step in (2, 4):
        path = os.path.join(workdir, "checkpoints", "dpo", str(step), "state")
        params[step] = _restore_params(path)
    for name in params[2]:
        np.testing.assert_array_equal(params[2][name], params[4][name], err_msg=name)


class _Wrapped:
    """An iterator whose batches come from `next_batch`, other methods from `inner`."""

    def __init__(self, inner, next_batch):
        self._inner, self._next = inner, next_batch

    def __iter__(self):
        return self

    def __next__(self):
        return self._next()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _restore_params(path) -> dict[str, np.ndarray]:
    """Flat {name: array} of the params in an orbax `state` item (read on the host)."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(path)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree["params"])
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def test_dpo_trains_from_the_hh_rlhf_tfds_builder(tmp_path):
    """Fake official HH files -> our hh_rlhf builder (array_record) -> the DPO loop."""
    from test_data_tfds import _hh_record, _write_jsonl_gz

    from dpo_jax.data import synthetic

    manual = tmp_path / "hh"
    for split, n in (("train", 12), ("test", 5)):
        records = [_hh_record("helpful-base", split, i) for i in range(n)]
        _write_jsonl_gz(manual / "helpful-base" / f"{split}.jsonl.gz", records)
    tokenizer_dir = str(tmp_path / "tokenizer")
    synthetic.build_char_tokenizer(tokenizer_dir)
    config = load_config("dpo")
    with config.unlocked():
        config.data.synthetic = False
        config.data.tokenizer = tokenizer_dir
        config.data.tfds_name = "hh_rlhf/helpful_base"
        config.data.tfds_data_dir = str(tmp_path / "tfds")
        config.data.tfds_manual_dir = str(manual)
        config.data.format = "standard"  # the builder already split off the HH prompts
        config.data.truncation_mode = "keep_end"
        config.data.max_length = 96
        config.data.max_prompt_length = 64
        config.data.pad_to_multiple_of = 32
    workdir = str(tmp_path / "run")
    loop.run(config, workdir)
    records = read_metrics(workdir)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["eval/pairs"] for r in evals] == [5, 5, 5]  # the test split, every time
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
