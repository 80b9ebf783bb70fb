"""The reward model: its head, its Bradley-Terry loss, the `rm` stage end to end (learning,
exact resume, pmap = jit), its Hugging Face export read back by transformers /
HFClassifierReward, and the import of transformers' `*ForSequenceClassification` models."""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_loop import load_config, read_metrics
from train_testlib import (
    SGD,
    assert_trees_close,
    grads_of,
    padded_batch,
    random_pairs,
    random_params,
    sgd_state,
    tiny_model,
)

from dpo_jax.data import synthetic
from dpo_jax.models import HFCheckpointError, reward
from dpo_jax.models.hf import from_hf_classifier
from dpo_jax.train import loop
from dpo_jax.train import reward as reward_step
from dpo_jax.train.validate import ConfigError, validate

# ------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------


def test_bradley_terry_loss_hand_values_and_trl_formula():
    import torch

    chosen, rejected = np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])
    margin = np.array([0.0, 0.5, 0.0])
    out = reward.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected), margin)
    # -log sigmoid(x) = log(1 + exp(-x)) at x = 1, -0.5, -1.
    np.testing.assert_allclose(out, np.log1p(np.exp(-np.array([1.0, -0.5, -1.0]))), rtol=1e-6)
    centred = reward.bradley_terry_loss(chosen, rejected, margin, center_rewards_coefficient=0.1)
    np.testing.assert_allclose(centred - out, 0.1 * np.array([1.0, 0.0, 25.0]), rtol=1e-6)
    # trl 1.16 RewardTrainer.compute_loss, with a margin and centring: the mean of ours.
    rc, rr, m = (torch.tensor(x) for x in (chosen, rejected, margin))
    trl = -torch.nn.functional.logsigmoid(rc - rr - m).mean() + 0.1 * torch.mean((rc + rr) ** 2)
    assert float(jnp.mean(centred)) == pytest.approx(float(trl), rel=1e-6)


# ------------------------------------------------------------------------------------------
# Head
# ------------------------------------------------------------------------------------------


def _padded(seq, length, left):
    pad = length - len(seq)
    tokens = [0] * pad + seq if left else seq + [0] * pad
    segments = [0] * pad + [1] * len(seq) if left else [1] * len(seq) + [0] * pad
    positions = [0] * pad + list(range(len(seq))) if left else list(range(len(seq))) + [0] * pad
    return [np.array([x], np.int32) for x in (tokens, positions, segments)]


def test_head_reads_the_last_real_token_of_left_or_right_padded_rows():
    model = reward.RewardModel(reward.trunk_config(tiny_model().config))
    params = random_params(model, seed=0)
    assert "lm_head" not in params and params["score"].shape == (model.config.hidden_size, 1)
    seq = [1, 5, 9, 13, 40]
    alone = model.apply({"params": params}, jnp.array([seq], jnp.int32))
    hidden, _ = model.apply({"params": params}, jnp.array([seq], jnp.int32), method="features")
    np.testing.assert_allclose(alone, hidden[:, -1] @ params["score"][:, 0], rtol=1e-5)
    for left in (False, True):
        out = model.apply({"params": params}, *_padded(seq, 9, left))
        np.testing.assert_allclose(out, alone, rtol=1e-5, atol=1e-6, err_msg=f"left={left}")
    np.testing.assert_array_equal(
        reward.last_token_index(jnp.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])), [1, 3, 0]
    )


def test_rm_step_gradient_is_the_mean_loss_over_real_pairs_for_any_accumulation():
    """5 real pairs in 8 slots: the step's gradient (SGD(1) with momentum: old - new) is
    the gradient of the mean BT loss (with centring) over the real pairs, scored apart from
    the batch layout, with or without micro-batches."""
    model = reward.RewardModel(reward.trunk_config(tiny_model().config))
    params = random_params(model, seed=1)
    pairs = random_pairs(5, seed=3)
    batch = {k: jnp.asarray(v) for k, v in padded_batch(pairs).items()}
    objective = reward_step.RewardObjective(center_rewards_coefficient=0.1)

    rows = [x.prompt_ids + r for x in pairs for r in (x.chosen_ids, x.rejected_ids)]
    columns = zip(*(_padded(r, 16, left=True) for r in rows), strict=True)
    left_padded = [np.concatenate(c) for c in columns]  # tokens, positions, segment ids

    def expected_loss(p):  # every sequence left-padded (the batch pads on the right)
        rewards = model.apply({"params": p}, *left_padded).reshape(-1, 2)
        return reward.bradley_terry_loss(rewards[:, 0], rewards[:, 1], 0.0, 0.1).mean()

    want = jax.jit(jax.grad(expected_loss))(params)
    state = sgd_state(params)
    for accum in (1, 4):
        step = reward_step.make_rm_step(model=model, tx=SGD, objective=objective, accum_steps=accum)
        new_state, metrics = jax.jit(step)(state, batch)
        assert float(metrics["pairs"]) == 5
        assert float(metrics["loss"]) == pytest.approx(float(expected_loss(params)), rel=1e-5)
        assert_trees_close(grads_of(state, new_state), want, rtol=1e-4, atol=1e-7)


def test_rm_stage_starts_from_the_language_model_without_lm_head():
    """`loop._reward_inputs`: the SFT stage's (or the model's) params minus `lm_head`, and
    a fresh `score` head ~ N(0, initializer_range), placed on the reward model's devices."""
    config = load_config("rm", "sft")
    lm = tiny_model()
    lm = type(lm)(dataclasses.replace(lm.config, tie_embeddings=False))
    params = random_params(lm, seed=2)
    assert "lm_head" in params
    devices, rm_params = loop._reward_inputs(config, lm, params, initial_params=None)
    assert isinstance(devices.model, reward.RewardModel) and "lm_head" not in rm_params
    rm_params = jax.device_get(rm_params)
    for name in params:
        if name != "lm_head":
            assert_trees_close(rm_params[name], params[name], rtol=0, atol=0)
    score = rm_params.pop("score")
    assert score.shape == (lm.config.hidden_size, 1)
    assert 0.5 < score.std() / lm.config.initializer_range < 2


# ------------------------------------------------------------------------------------------
# The rm stage end to end
# ------------------------------------------------------------------------------------------


def _easy_pairs(n, seed):
    """Pairs a tiny model separates in a few steps: chosen responses use a-e, rejected v-z."""
    rng = random.Random(seed)

    def text(letters):
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))

    return [
        {"prompt": text("0123456789") + "=", "chosen": text("abcde"), "rejected": text("vwxyz")}
        for _ in range(n)
    ]


def _rm_config(data_dir):
    config = load_config("rm")
    with config.unlocked():
        config.data.synthetic = False
        config.data.tokenizer = os.path.join(data_dir, "tokenizer")
        config.data.train_files = (os.path.join(data_dir, "train.jsonl"),)
        config.data.eval_files = (os.path.join(data_dir, "eval.jsonl"),)
        config.export_hf = True
    return config


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """One uninterrupted rm:tiny run on easy pairs: (workdir, config, final params)."""
    data_dir = str(tmp_path_factory.mktemp("rm_data"))
    synthetic.build_char_tokenizer(os.path.join(data_dir, "tokenizer"))
    for name, n, seed in (("train", 96, 0), ("eval", 32, 1)):
        synthetic.write_jsonl(_easy_pairs(n, seed), os.path.join(data_dir, f"{name}.jsonl"))
    workdir = str(tmp_path_factory.mktemp("rm"))
    config = _rm_config(data_dir)
    params = loop.run(config, workdir)
    return workdir, config, jax.device_get(params)


def test_rm_stage_logs_its_metrics_and_held_out_accuracy_rises(rm_run):
    workdir, config, _ = rm_run
    records = [r for r in read_metrics(workdir) if r["stage"] == "rm"]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, config.rm.steps + 1))
    for key in ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert all(np.isfinite(r[key]) for r in train), key
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == config.rm.steps
    assert evals[0]["eval/pairs"] == 32
    # A fresh head: near-zero rewards, loss ~ log 2; trained: the easy pairs are ranked.
    assert evals[0]["eval/loss"] == pytest.approx(np.log(2), abs=0.05)
    assert evals[-1]["eval/accuracy"] >= 0.9
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["rm"]


def test_rm_export_loads_in_transformers_with_our_rewards(rm_run):
    from dpo_jax.evaluation.rewards import HFClassifierReward

    workdir, config, params = rm_run
    hf_dir = os.path.join(workdir, "hf")
    hf_config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["num_labels"] == 1 and hf_config["pad_token_id"] == 0
    scorer = HFClassifierReward(hf_dir, batch_size=3)  # padded batches of unequal lengths
    completions = ["abcab", "xyz", "a", "vwxyzvw", "dead"]
    theirs = scorer([""] * len(completions), completions)
    lm, _ = loop.build_model(config, len(scorer.tokenizer))
    model = reward.RewardModel(reward.trunk_config(lm.config))
    ours = [
        float(model.apply({"params": params}, jnp.array([scorer.tokenizer(t)["input_ids"]]))[0])
        for t in completions
    ]
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert theirs[0] > theirs[1]  # the trained ranking survives the export


def test_rm_resume_from_an_earlier_checkpoint_is_exact(rm_run, tmp_path):
    """Copy the finished run, delete its final checkpoint, rerun: the run redoes the last
    steps from the previous checkpoint and exports bitwise the same reward model."""
    workdir, config, _ = rm_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "hf"))
    shutil.rmtree(os.path.join(copy, "checkpoints", "rm", str(config.rm.steps)))
    loop.run(config, copy)
    reference = load_file(os.path.join(workdir, "hf", "model.safetensors"))
    resumed = load_file(os.path.join(copy, "hf", "model.safetensors"))
    assert reference.keys() == resumed.keys() and "score.weight" in reference
    for name in reference:
        np.testing.assert_array_equal(reference[name], resumed[name], err_msg=name)
    steps = [r["step"] for r in read_metrics(copy) if r["stage"] == "rm" and "loss" in r]
    assert steps == list(range(1, config.rm.steps + 1))
    assert glob.glob(os.path.join(copy, "checkpoints", "rm", str(config.rm.steps)))


def test_rm_pmap_mode_matches_jit_mode(rm_run, tmp_path):
    """The rm stage under parallel.mode=pmap (8 replicas; loss and metrics psum'ed over the
    global batch) trains like the jit run (mesh over 8 devices): same params and metrics."""
    workdir, config, params = rm_run
    config = copy.deepcopy(config)
    with config.unlocked():
        config.parallel.mode = "pmap"
        config.export_hf = False
    pmap_params = jax.device_get(loop.run(config, str(tmp_path)))
    assert_trees_close(pmap_params, params, rtol=1e-5, atol=1e-6)
    ours = [r for r in read_metrics(str(tmp_path)) if r["stage"] == "rm"]
    theirs = [r for r in read_metrics(workdir) if r["stage"] == "rm"]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    compared = set()
    for a, b in zip(ours, theirs, strict=True):
        for key in [k for k in b if k == "loss" or k.startswith(("eval/", "rewards/", "acc"))]:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
            compared.add(key)
    assert {"loss", "accuracy", "eval/loss", "eval/accuracy", "rewards/margins"} <= compared


def test_rm_export_imports_back_bitwise(rm_run):
    workdir, config, params = rm_run
    model, loaded = from_hf_classifier(os.path.join(workdir, "hf"))
    assert isinstance(model, reward.RewardModel) and model.config.tie_embeddings
    assert_trees_close(loaded, params, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Import of transformers' *ForSequenceClassification
# ------------------------------------------------------------------------------------------

PAD = 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_from_hf_classifier_scores_equal_transformers(family, tmp_path):
    """A tiny random transformers classifier (num_labels=1, every weight perturbed), read
    back: our rewards of right-padded rows of unequal lengths equal its logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_models_hf import CASES

    hf_config = CASES[family]()
    hf_config.num_labels, hf_config.pad_token_id = 1, PAD
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForSequenceClassification.from_config(hf_config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path)
    model, params = from_hf_classifier(str(tmp_path))

    lengths = [9, 4, 12, 1]
    rng = np.random.default_rng(0)
    tokens = np.full((len(lengths), 12), PAD, np.int64)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(1, 256, size=n)
    real = (tokens != PAD).astype(np.int32)
    with torch.no_grad():
        mask = torch.tensor(real)
        theirs = hf_model(torch.tensor(tokens), attention_mask=mask).logits[:, 0].numpy()
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    ours = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32), positions, real)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.std(theirs) > 1e-3  # the rows really score differently


def test_from_hf_classifier_refuses_other_checkpoints(rm_run, tmp_path):
    hf_dir = os.path.join(rm_run[0], "hf")
    hf_config = json.load(open(os.path.join(hf_dir, "config.json")))
    for name, changes, message in [
        ("lm", {"architectures": ["LlamaForCausalLM"]}, "no \\*ForSequenceClassification"),
        ("two", {"num_labels": 2}, "num_labels=2"),
    ]:
        path = tmp_path / name
        shutil.copytree(hf_dir, path)
        json.dump({**hf_config, **changes}, open(path / "config.json", "w"))
        with pytest.raises(HFCheckpointError, match=message):
            from_hf_classifier(str(path))
    # A classifier without its head is missing a tensor, named.
    path = tmp_path / "headless"
    shutil.copytree(hf_dir, path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["score.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match="score.weight"):
        from_hf_classifier(str(path))


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stages": ("sft", "dpo", "rm")}, "run them separately"),
        ({"rm.init_from": "sft"}, "needs 'sft' in config.stages"),
        ({"rm.center_rewards_coefficient": -1.0}, "rm.center_rewards_coefficient"),
        ({"data.layout": "packed"}, "padded batches"),
    ],
)
def test_rm_config_errors(overrides, message):
    config = load_config("rm")
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)
