"""End to end: `dpo_jax.evaluate` on tiny models exported with to_hf and on a fake training
workdir (orbax checkpoints of SFT and DPO states), with configs/evaluate.py:tiny."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import models, parallel
from dpo_jax.data import synthetic
from dpo_jax.data.tokenize import load_tokenizer
from dpo_jax.evaluation import inputs, kl, rewards
from dpo_jax.evaluation import run as run_lib
from dpo_jax.train.checkpoints import StageCheckpointer
from dpo_jax.train.state import state_from_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "evaluate.py")
VOCAB = 100  # the synthetic char tokenizer's


def tiny_config(**fields):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import evaluate as evaluate_config  # configs/evaluate.py
    finally:
        sys.path.pop(0)
    config = evaluate_config.get_config("tiny")
    with config.unlocked():
        for dotted, value in fields.items():
            *parents, leaf = dotted.split(".")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
    return config


def _model():
    cfg = models.ModelConfig.tiny(
        vocab_size=VOCAB,
        hidden_size=32,
        num_heads=2,
        head_dim=16,
        mlp_dim=64,
        num_kv_heads=1,
        initializer_range=0.5,
    )
    return models.DecoderLM(cfg)


def _params(model, seed):
    init = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.device_get(parallel.unbox(init))


def _export(path, seed):
    model = _model()
    models.to_hf(model, _params(model, seed), path)
    synthetic.build_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    policy = _export(os.fspath(root / "policy"), 0)
    reference = _export(os.fspath(root / "reference"), 1)
    prompts = synthetic.write_jsonl(
        synthetic.make_preference_records(10, seed=3), root / "prompts.jsonl"
    )
    return policy, reference, prompts


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_hf_policy_end_to_end(hf_dirs, tmp_path, capsys):
    policy, reference, prompts = hf_dirs
    config = tiny_config(
        policy_hf_path=policy,
        reference_hf_path=reference,
        **{"prompts.files": (prompts,), "judge_template": "hh"},
    )
    rows = run_lib.run(config, os.fspath(tmp_path))
    assert [(r["checkpoint"], r["temperature"]) for r in rows] == [("hf", 0.0), ("hf", 1.0)]
    table = capsys.readouterr().out
    assert "win vs chosen" in table and table.count("\nhf ") == 2

    csv_rows = _read_csv(tmp_path / "eval" / "metrics.csv")
    assert len(csv_rows) == 2 and set(run_lib.COLUMNS) == set(csv_rows[0])
    samples = [json.loads(line) for line in open(tmp_path / "eval" / "samples_hf.jsonl")]
    assert len(samples) == 2 * 8 * 2  # temperatures x prompts x samples per prompt
    greedy = [s for s in samples if s["temperature"] == 0.0]
    sampled = [s for s in samples if s["temperature"] == 1.0]
    # Greedy: both samples of a prompt are the argmax continuation, log-prob 0 under the
    # (point-mass) sampling distribution.
    assert all(g["logp"] == 0.0 for g in greedy)
    assert greedy[0]["completion"] == greedy[1]["completion"]
    assert len({s["completion"] for s in sampled}) > 8

    # The KL column is the mean of logp - ref_logp, and ref_logp is the reference's
    # teacher-forced log-prob of the sampled completion (recomputed here independently).
    ref_model, ref_params = models.from_hf(reference)
    tokenizer = load_tokenizer(policy)
    for row, group in ((rows[0], greedy), (rows[1], sampled)):
        d = np.array([s["logp"] - s["ref_logp"] for s in group])
        assert row["kl_mean"] == pytest.approx(d.mean(), rel=1e-6)
        assert row["kl_stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(d.size), rel=1e-6)
        assert row["length_mean"] == pytest.approx(np.mean([s["length"] for s in group]))
    assert rows[1]["kl_mean"] > 0.5  # two different random models
    s = sampled[3]
    prompt_ids = tokenizer(s["prompt"])["input_ids"]
    completion_ids = tokenizer(s["completion"], add_special_tokens=False)["input_ids"]
    if s["stopped"]:
        completion_ids.append(tokenizer.eos_token_id)
    want = kl.completion_logps(ref_model, ref_params, [prompt_ids], [completion_ids])[0]
    assert s["ref_logp"] == pytest.approx(want, abs=1e-4)
    # The policy's own sampled-token log-probs agree with teacher forcing (T = 1).
    pol_model, pol_params = models.from_hf(policy)
    own = kl.completion_logps(pol_model, pol_params, [prompt_ids], [completion_ids])[0]
    assert s["model_logp"] == pytest.approx(own, abs=1e-4)
    assert s["logp"] == pytest.approx(own, abs=1e-4)

    # VADER on the toy task's letter strings, vs the chosen strings: all ties.
    assert rows[1]["reward_mean"] == pytest.approx(np.mean([s["reward"] for s in sampled]))
    assert 0 <= rows[1]["win_rate_ci_low"] <= rows[1]["win_rate_vs_chosen"] <= 1
    judge_file = tmp_path / "eval" / "judge_hf_T1_vs_chosen.jsonl"
    assert len(open(judge_file).readlines()) == 16


def test_same_policy_and_reference_has_zero_kl(hf_dirs, tmp_path):
    policy, _, prompts = hf_dirs
    # 10 prompts in batches of 4: the last batch is filled up with copies, then dropped.
    config = tiny_config(
        policy_hf_path=policy,
        reference_hf_path=policy,
        **{
            "prompts.files": (prompts,),
            "reward.name": "none",
            "sampling.temperatures": (1.0,),
            "prompts.max_prompts": 10,
        },
    )
    (row,) = run_lib.run(config, os.fspath(tmp_path))
    assert row["samples"] == 20
    samples = [json.loads(line) for line in open(tmp_path / "eval" / "samples_hf.jsonl")]
    records = [json.loads(line) for line in open(prompts)]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in records for _ in range(2)]
    assert [s["prompt_index"] for s in samples] == [i // 2 for i in range(20)]
    # Cached decoding vs a full teacher-forced forward: equal up to float32 rounding.
    assert abs(row["kl_mean"]) < 1e-4 and row["kl_stderr"] < 1e-4
    assert row["implicit_reward_mean"] == pytest.approx(0.0, abs=1e-5)
    assert "reward_mean" not in row


def test_command_line(hf_dirs, tmp_path):
    policy, reference, prompts = hf_dirs
    cmd = [
        sys.executable,
        "-m",
        "dpo_jax.evaluate",
        f"--config={CONFIG}:tiny",
        f"--workdir={tmp_path}",
        f"--config.policy_hf_path={policy}",
        f"--config.reference_hf_path={reference}",
        f"--config.prompts.files=('{prompts}',)",
        "--config.sampling.temperatures=(0.5,)",
    ]
    # One device (not conftest's 8 fake ones), with conftest's faster-compile flags.
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if "device_count" not in f]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "win vs chosen" in out.stdout
    (row,) = _read_csv(tmp_path / "eval" / "metrics.csv")
    assert row["checkpoint"] == "hf" and float(row["temperature"]) == 0.5


# --------------------------------------------------------------------------------------------
# A training workdir: config.json, data/, checkpoints/{sft,dpo}/<step>/{state,data}
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A quickstart-like workdir written without training: SFT ends at step 6 with params
    `sft`; DPO checkpoint 2 holds the SFT params (policy = reference), 4 other params."""
    from dpo_jax.train import inputs
    from dpo_jax.train.defaults import base_config, shrink_to_tiny

    root = os.fspath(tmp_path_factory.mktemp("run"))
    train = base_config()
    train.stages = ("sft", "dpo")
    train = shrink_to_tiny(train)
    train.model.overrides.hidden_size = 32
    train.model.overrides.initializer_range = 0.5  # peaked distributions: a KL far from 0
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write(train.to_json_best_effort(indent=2))
    inputs.generate_synthetic(train.data, train.seed, os.path.join(root, "data"))

    model = models.DecoderLM(
        models.ModelConfig.tiny(vocab_size=VOCAB, hidden_size=32, initializer_range=0.5)
    )
    sft, other = _params(model, 5), _params(model, 6)
    tx = optax.adam(1e-3)
    for stage, steps in (("sft", {6: sft}), ("dpo", {2: sft, 4: other})):
        checkpointer = StageCheckpointer(os.path.join(root, "checkpoints", stage), async_save=False)
        for step, params in steps.items():
            state = state_from_params(params, tx, jax.random.key(0))
            checkpointer.save(step, state, {"position": step}, force=True)
        checkpointer.close()
    return root, model, sft


def test_training_workdir_every_checkpoint(workdir):
    root, model, sft = workdir
    restored = inputs.restore_params(os.path.join(root, "checkpoints", "sft", "6"))
    jax.tree.map(np.testing.assert_array_equal, restored, sft)

    rows = run_lib.run(tiny_config(**{"sampling.temperatures": (1.0,)}), root)
    assert [r["checkpoint"] for r in rows] == ["2", "4"]
    # Step 2 is the SFT model itself: KL to the reference (the SFT checkpoint) vanishes.
    assert abs(rows[0]["kl_mean"]) < 1e-4
    assert rows[1]["kl_mean"] > 10 * rows[1]["kl_stderr"] > 0
    assert os.path.exists(os.path.join(root, "eval", "samples_2.jsonl"))
    assert os.path.exists(os.path.join(root, "eval", "samples_4.jsonl"))
    latest = run_lib.run(tiny_config(checkpoints="latest", **{"reward.name": "none"}), root)
    assert [(r["checkpoint"], r["temperature"]) for r in latest] == [("4", 0.0), ("4", 1.0)]


def test_workdir_errors(workdir, tmp_path):
    root, _, _ = workdir
    with pytest.raises(FileNotFoundError, match=r"hf: no final Hugging Face export"):
        run_lib.run(tiny_config(checkpoints="final"), root)
    empty = tmp_path / "empty_run"
    os.makedirs(empty / "checkpoints" / "dpo")
    for name in ("config.json", "data"):
        os.symlink(os.path.join(root, name), empty / name)
    with pytest.raises(FileNotFoundError, match=r"checkpoints/dpo: no checkpoint"):
        run_lib.run(tiny_config(), os.fspath(empty))
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        run_lib.run(tiny_config(), os.fspath(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="checkpoints='best'"):
        run_lib.run(tiny_config(checkpoints="best"), root)


def test_hf_policy_needs_reference_and_prompts(hf_dirs, tmp_path):
    policy, _, prompts = hf_dirs
    with pytest.raises(ValueError, match="reference_hf_path is empty"):
        run_lib.run(tiny_config(policy_hf_path=policy, **{"prompts.files": (prompts,)}), tmp_path)
    with pytest.raises(ValueError, match="set config.prompts.files"):
        run_lib.run(tiny_config(policy_hf_path=policy, reference_hf_path=policy), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab=", "chosen": "ba", "rejected": "bb"}\n{"prompt": "x="}\n')
    config = tiny_config(
        policy_hf_path=policy, reference_hf_path=policy, **{"prompts.files": (os.fspath(bad),)}
    )
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: cannot tell the format"):
        run_lib.run(config, tmp_path)


def test_classifier_reward_and_win_rate_vs_chosen(hf_dirs, tmp_path):
    """reward.name='classifier': a tiny 2-class GPT-2 classifier saved by the test; the win
    rate against the dataset's chosen responses is recomputed from the samples file."""
    import torch
    import transformers

    policy, reference, prompts = hf_dirs
    torch.manual_seed(0)
    classifier = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            n_positions=64,
            vocab_size=VOCAB,
            num_labels=2,
            id2label={0: "NEG", 1: "POS"},
            pad_token_id=0,
        )
    )
    with torch.no_grad():
        classifier.score.weight.normal_(0, 1.0)
    path = os.fspath(tmp_path / "classifier")
    classifier.save_pretrained(path)
    synthetic.build_char_tokenizer(path)
    config = tiny_config(
        policy_hf_path=policy,
        reference_hf_path=reference,
        **{
            "prompts.files": (prompts,),
            "reward.name": "classifier",
            "reward.path": path,
            "reward.label": "POS",
            "sampling.temperatures": (1.0,),
        },
    )
    (row,) = run_lib.run(config, os.fspath(tmp_path / "out"))
    samples = [json.loads(line) for line in open(tmp_path / "out" / "eval" / "samples_hf.jsonl")]
    scores = np.array([s["reward"] for s in samples])
    assert row["reward_mean"] == pytest.approx(scores.mean()) and np.ptp(scores) > 0
    records = [json.loads(line) for line in open(prompts)][:8]
    reward = rewards.HFClassifierReward(path, label="POS")
    chosen = reward([""] * 8, [r["chosen"] for r in records])
    wins = np.sign(scores - np.repeat(chosen, 2)) / 2 + 0.5
    assert row["win_rate_vs_chosen"] == pytest.approx(wins.mean())


def test_win_rate_vs_baseline_samples(hf_dirs, tmp_path):
    """The paper's second comparison: the policy's samples against another system's samples
    (here the reference model's, from an earlier evaluation), row by row."""
    import torch
    import transformers

    policy, reference, prompts = hf_dirs
    torch.manual_seed(1)
    classifier = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_labels=1,
            pad_token_id=0,
        )
    )
    path = os.fspath(tmp_path / "reward_model")
    classifier.save_pretrained(path)
    synthetic.build_char_tokenizer(path)
    fields = {"prompts.files": (prompts,), "reward.name": "classifier", "reward.path": path}
    base = tiny_config(policy_hf_path=reference, reference_hf_path=reference, **fields)
    run_lib.run(base, os.fspath(tmp_path / "base"))
    base_file = os.fspath(tmp_path / "base" / "eval" / "samples_hf.jsonl")

    config = tiny_config(
        policy_hf_path=policy,
        reference_hf_path=reference,
        baseline_samples=base_file,
        judge_template="tldr",
        **fields,
    )
    rows = run_lib.run(config, os.fspath(tmp_path / "policy"))
    assert "win vs baseline [95% CI]" in run_lib.format_table(rows)
    mine = [json.loads(x) for x in open(tmp_path / "policy" / "eval" / "samples_hf.jsonl")]
    theirs = [json.loads(x) for x in open(base_file)]
    for row in rows:
        t = row["temperature"]
        a = np.array([s["reward"] for s in mine if s["temperature"] == t])
        b = np.array([s["reward"] for s in theirs if s["temperature"] == t])
        assert a.size == b.size == 16 and not np.allclose(a, b)
        assert row["win_rate_vs_baseline"] == pytest.approx(np.mean((a > b) + 0.5 * (a == b)))
        assert row["win_rate_vs_baseline_ci_low"] < row["win_rate_vs_baseline"]
    requests = tmp_path / "policy" / "eval" / "judge_hf_T1_vs_baseline.jsonl"
    first = json.loads(open(requests).readline())
    assert first["a"] == mine[16]["completion"] and first["b"] == theirs[16]["completion"]

    # A system against its own samples (same seed, same prompts): every pair ties.
    itself = tiny_config(
        policy_hf_path=reference, reference_hf_path=reference, baseline_samples=base_file, **fields
    )
    for row in run_lib.run(itself, os.fspath(tmp_path / "itself")):
        assert row["win_rate_vs_baseline"] == 0.5

    # Other prompts than the baseline's: refused, naming the file.
    other = synthetic.write_jsonl(
        synthetic.make_preference_records(8, seed=9), tmp_path / "o.jsonl"
    )
    mismatch = tiny_config(
        policy_hf_path=policy,
        reference_hf_path=reference,
        baseline_samples=base_file,
        **{**fields, "prompts.files": (other,)},
    )
    with pytest.raises(ValueError, match="samples_hf.jsonl:1: prompt 0 is .*not the same prompts"):
        run_lib.run(mismatch, os.fspath(tmp_path / "mismatch"))
    more = tiny_config(
        policy_hf_path=policy,
        reference_hf_path=reference,
        baseline_samples=base_file,
        **{**fields, "sampling.num_samples": 3},
    )
    with pytest.raises(ValueError, match=r"no baseline sample .* = \(0, 2\) at temperature 0"):
        run_lib.run(more, os.fspath(tmp_path / "more"))
