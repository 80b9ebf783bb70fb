"""`config.eval.generate`: a DPO run samples its held-out prompts along training and logs
reward, KL to the reference and win rate (the paper's reward-KL curve), with the samples."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_loop import load_config, read_metrics

from dpo_jax.train import loop
from dpo_jax.train.validate import ConfigError, validate


def _config(reference: str = "params"):
    config = load_config("dpo")
    with config.unlocked():
        config.dpo.reference = reference
        g = config.eval.generate
        g.every_steps = 3
        g.num_prompts = 4
        g.sampling.max_new_tokens = 4
        g.sampling.num_samples = 2
        g.sampling.batch_size = 4
        g.kl_batch_size = 8
    return config


def _generated(workdir):
    return [r for r in read_metrics(workdir) if "generate/samples" in r]


def test_generation_is_scored_along_training_with_kl_to_the_reference(tmp_path):
    workdir = str(tmp_path / "run")
    loop.run(_config(), workdir)
    records = _generated(workdir)
    assert [r["step"] for r in records] == [0, 3, 6]
    for r in records:
        assert r["generate/samples"] == 8  # 4 prompts x 2 samples
        assert np.isfinite(r["generate/reward_mean"]) and 0 <= r["generate/win_rate_vs_chosen"] <= 1
    # At step 0 the policy is the reference: its KL is 0 (up to float32 rounding) and so is
    # its implicit reward; training moves both away from 0.
    assert abs(records[0]["generate/kl_mean"]) < 1e-4
    assert abs(records[0]["generate/implicit_reward_mean"]) < 1e-5
    assert abs(records[-1]["generate/kl_mean"]) > 1e-3
    with open(os.path.join(workdir, "eval", "train_samples_6.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 8 and {"prompt", "completion", "reward", "ref_logp"} <= set(samples[0])


def test_without_reference_params_only_the_reward_is_logged(tmp_path):
    workdir = str(tmp_path / "cached")
    loop.run(_config("cached"), workdir)
    records = _generated(workdir)
    assert records and all("generate/kl_mean" not in r for r in records)
    assert all("generate/reward_mean" in r for r in records)


def test_generation_settings_are_validated():
    config = _config()
    config.eval.generate.sampling.temperatures = ()
    config.eval.generate.reward.name = "gpt4"
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert "config.eval.generate.sampling.temperatures=()" in str(info.value)
    assert "config.eval.generate.reward.name='gpt4'" in str(info.value)
