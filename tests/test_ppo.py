"""The PPO stage: it raises its reward, resumes exactly after kill -9, scores rollouts as they
were sampled, and refuses bad configs.

Runs use configs/ppo.py:tiny (a random tiny model on the toy task's prompts, the reward the
number of "a" characters in the response: a reward a few PPO iterations can move, unlike
VADER on random characters, which is 0 almost everywhere) on the 8 fake CPU devices of
tests/conftest.py.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import ROOT, load_config, read_metrics

from dpo_jax import sampling
from dpo_jax.models import ModelConfig
from dpo_jax.models.decoder import DecoderLM
from dpo_jax.models.reward import from_lm_params, trunk_config
from dpo_jax.models.value import ValueModel
from dpo_jax.train import inputs, loop, ppo_rollout
from dpo_jax.train.validate import ConfigError, validate

PPO_STEPS = 6


def _restore_policy(workdir: str, step: int) -> dict[str, np.ndarray]:
    """Flat {name: array} of the policy params in the PPO checkpoint of `step`."""
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", "ppo", str(step), "state")
    tree = ocp.StandardCheckpointer().restore(path)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree["params"]["policy"])
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """One uninterrupted configs/ppo.py:tiny run: (workdir, config, final policy params)."""
    workdir = str(tmp_path_factory.mktemp("ppo"))
    config = load_config("ppo")
    assert config.ppo.steps == PPO_STEPS
    return workdir, config, loop.run(config, workdir)


def test_tiny_ppo_raises_the_reward_of_its_samples(ppo_run):
    """Before/after on 32 held-out prompts x 4 samples, the same sampling key: the mean count
    of "a" rises several-fold (a uniform tiny model emits "a" ~1% of the time)."""
    workdir, config, final = ppo_run
    splits = inputs.load_splits(config, workdir)
    tokenizer = splits.tokenizer
    model, _ = loop.build_model(config, len(tokenizer))
    initial = loop.Devices(config, model, jnp.zeros((1, 1), jnp.int32)).initial_params(
        None, config.seed
    )
    prompts = [p.prompt_ids for p in splits.eval_pairs[:32]]

    def mean_count(params):
        out = sampling.sample(model, jax.device_get(params), prompts, rng=123, num_samples=4,
                              max_new_tokens=config.ppo.max_new_tokens,
                              eos_id=tokenizer.eos_token_id)  # fmt: skip
        texts = [tokenizer.decode(t[:n].tolist(), skip_special_tokens=True)
                 for t, n in zip(out.tokens, out.lengths, strict=True)]  # fmt: skip
        return np.mean([t.count("a") for t in texts])

    before, after = mean_count(initial), mean_count(final)
    assert after > max(3 * before, before + 0.2), (before, after)
    records = [r for r in read_metrics(workdir) if r["stage"] == "ppo"]
    assert [r["step"] for r in records] == list(range(1, PPO_STEPS + 1))
    for key in ("score", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "entropy", "response_length"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy = reference at first
    # The adaptive controller: KL below the target (1 nat) lowers beta_KL, above raises it,
    # by at most 20% x batch / horizon = 3.2% per iteration.
    coefs = [r["kl_coef"] for r in records]
    assert coefs[0] == config.ppo.kl_coef
    for r, before, after in zip(records, coefs, coefs[1:], strict=False):
        assert (after - before) * (r["kl"] - config.ppo.kl_target) > 0, (before, after, r["kl"])
        assert abs(after / before - 1) <= 0.2 * config.ppo.batch_size / config.ppo.kl_horizon + 1e-6
    assert "PPO rollouts: iteration 1 -> 6" in loop.summarize(workdir)


def test_the_evaluation_job_reads_a_ppo_workdirs_policy_and_reference(ppo_run):
    """`dpo_jax.evaluate` on a PPO workdir: every PPO checkpoint's policy (the "policy" half
    of its {"policy", "value"} params), against the policy PPO started from."""
    from test_evaluate import tiny_config

    from dpo_jax.evaluation import inputs as eval_inputs
    from dpo_jax.evaluation import run as eval_run

    workdir, config, final = ppo_run
    vocab = len(inputs.load_splits(config, workdir).tokenizer)
    steps = eval_inputs.checkpoint_steps(os.path.join(workdir, "checkpoints", "ppo"))
    policies = eval_inputs.resolve_policies(tiny_config(), workdir, vocab)
    assert [p.label for p in policies] == [str(s) for s in steps] and steps[-1] == PPO_STEPS
    _, last = policies[-1].load()
    jax.tree.map(np.testing.assert_array_equal, last, jax.device_get(final))
    model, reference = eval_inputs.load_reference(tiny_config(), workdir, vocab)
    initial = loop.Devices(config, model, jnp.zeros((1, 1), jnp.int32)).initial_params(
        None, config.seed
    )
    # The same seeded init, jitted in the loop and run eagerly here: equal to the last bit
    # or two of float32.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9)
    jax.tree.map(close, reference, jax.device_get(initial))

    fields = {"sampling.temperatures": (1.0,), "reward.name": "none", "checkpoints": "latest"}
    rows = eval_run.run(tiny_config(**fields), workdir)
    assert [r["checkpoint"] for r in rows] == [str(PPO_STEPS)]
    assert np.isfinite(rows[0]["kl_mean"]) and rows[0]["kl_mean"] > 0  # PPO moved the policy


@pytest.mark.slow
def test_kill_9_then_rerun_equals_the_uninterrupted_run(ppo_run, tmp_path):
    """`kill -9` the real command after a random number of PPO iterations, rerun it: the final
    policy equals the uninterrupted run's bit for bit (KL coefficient, prompt position and
    rollout key come back from the checkpoint)."""
    reference_dir = ppo_run[0]
    seed = random.randrange(10**6)
    kill_after = random.Random(seed).randint(1, PPO_STEPS - 1)
    workdir = str(tmp_path / "killed")
    command = [sys.executable, "-m", "dpo_jax.main",
               "--config=" + os.path.join(ROOT, "configs", "ppo.py") + ":tiny",
               "--workdir=" + workdir]  # fmt: skip
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline, killed = time.time() + 600, False
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                if sum('"stage": "ppo"' in line for line in f) >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
    reference, resumed = (
        _restore_policy(reference_dir, PPO_STEPS),
        _restore_policy(workdir, PPO_STEPS),
    )
    for name in reference:
        np.testing.assert_array_equal(
            reference[name], resumed[name], err_msg=f"{name} (kill seed {seed})"
        )
    kept = [r["step"] for r in read_metrics(workdir) if r["stage"] == "ppo"]
    assert kept == list(range(1, PPO_STEPS + 1))  # no iteration logged twice


@pytest.mark.slow
def test_sft_then_reward_model_then_ppo_against_it(tmp_path):
    """configs/ppo.py:tiny_learned, shortened: the PPO stage scores its rollouts with the
    reward model the run just trained, and the run returns the policy (not the reward model)."""
    config = _with(load_config("ppo", "tiny_learned"), sft__steps=2, rm__steps=2, ppo__steps=2)
    params = loop.run(config, str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if r["stage"] == "ppo"] == [1, 2]
    assert any(r["stage"] == "rm" for r in records)
    scores = [r["score"] for r in records if r["stage"] == "ppo"]
    assert all(np.isfinite(scores)) and len(set(scores)) == 2  # a learned, varying reward
    assert "lm_head" in params and "score" not in params


def test_scoring_matches_the_samplers_log_probs():
    """The jitted scoring's policy log-probs of the sampled tokens equal the sampler's
    `model_logps` (1e-5), prompts of different lengths; with reference = policy the KL and
    the KL part of the rewards are 0, and the score sits on each row's last token."""
    model = DecoderLM(ModelConfig.tiny(vocab_size=64))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    value = ValueModel(trunk_config(model.config))
    value_params = from_lm_params(params, 0.02 * jnp.ones((model.config.hidden_size, 1)))
    prompts = [[1, 5, 9], [1, 7], [1, 3, 4, 8, 2, 6], [1, 10, 11, 12]]
    out = sampling.sample(model, params, prompts, rng=7, max_new_tokens=6, eos_id=2)
    rows = ppo_rollout.rollout_rows(prompts, out.tokens, out.lengths, width=8)
    scores = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    score = jax.jit(
        lambda p, ref, rows, s, c: ppo_rollout.score_rollout(
            p, ref, rows, s, c, policy=model, value=value, options=ppo_rollout.RolloutOptions()
        )
    )
    got = score({"policy": params, "value": value_params}, params, rows, scores,
                jnp.float32(0.1))  # fmt: skip
    mask = rows["mask"] > 0
    np.testing.assert_allclose(np.where(mask, got["logps"], 0.0),
                               np.where(mask, out.model_logps, 0.0), atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(got["ref_logps"], got["logps"], atol=0)
    np.testing.assert_array_equal(got["kl"], 0.0)
    last = np.asarray(out.lengths) - 1
    expected = np.zeros(mask.shape, np.float32)
    expected[np.arange(4), last] = scores
    np.testing.assert_allclose(got["rewards"], expected, atol=1e-6)
    # Values are the value model's on the row, one column left of each response token.
    full = value.apply({"params": value_params}, rows["tokens"], rows["positions"],
                       rows["segment_ids"])  # fmt: skip
    np.testing.assert_allclose(
        got["values"], np.where(mask, np.asarray(full)[:, 7:-1], 0.0), rtol=1e-6, atol=1e-6
    )


def test_score_normalisation_uses_the_running_moments_of_all_scores_so_far():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size) for size in (5, 8, 1)]
    moments = {"mean": 0.0, "var": 0.0, "count": 0}
    for i, batch in enumerate(batches):
        seen = np.concatenate(batches[: i + 1])
        normed, moments = ppo_rollout.normalize_scores(batch, moments, "norm")
        passed, _ = ppo_rollout.normalize_scores(batch, moments, "none")
        assert moments["count"] == seen.size
        np.testing.assert_allclose(moments["mean"], seen.mean(), rtol=1e-12)
        std = seen.std(ddof=1)
        np.testing.assert_allclose(normed, (batch - seen.mean()) / std, rtol=1e-6)
        np.testing.assert_array_equal(passed, batch)  # "none" passes scores through
    only_scale, _ = ppo_rollout.normalize_scores(batches[0], {"mean": 0.0, "var": 0.0,
                                                               "count": 0}, "scale")  # fmt: skip
    np.testing.assert_allclose(only_scale, batches[0] / batches[0].std(ddof=1), rtol=1e-6)


def _with(config, **fields):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for dotted, value in fields.items():
            *parents, leaf = dotted.split("__")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
    return config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(stages=("sft", "dpo", "ppo")), "'ppo' and 'dpo' both train the policy"),
        (dict(parallel__mode="pmap"), "the PPO stage runs on a jit mesh only"),
        (dict(ppo__value_model="shared"), "config.ppo.value_model='shared'"),
        (dict(ppo__reward="learned"), "ppo.reward='learned' needs an 'rm' stage"),
        (dict(ppo__ground_truth__target=""), "the count reward needs the substring"),
        (dict(ppo__ground_truth__name="bleu"), "config.ppo.ground_truth.name='bleu'"),
        (dict(ppo__num_minibatches=3), "config.ppo.num_minibatches=3 must divide"),
        (dict(ppo__num_minibatches=4), "minibatches of 4 rollouts"),
        (dict(ppo__kl_target=-1.0), "config.ppo.kl_target=-1.0"),
        (dict(ppo__kl_estimator="full"), "config.ppo.kl_estimator='full'"),
        (dict(ppo__lam=1.5), "config.ppo.lam=1.5"),
        (dict(ppo__score_norm="zscore"), "config.ppo.score_norm='zscore'"),
        (dict(ppo__init_from="sft"), "config.ppo.init_from='sft' needs 'sft'"),
    ],
)
def test_config_validation_names_the_bad_ppo_key(fields, message):
    config = _with(load_config("ppo"), **fields)
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert message in str(err.value)


def test_the_learned_reward_config_validates():
    config = load_config("ppo", "tiny_learned")
    assert config.stages == ("sft", "rm", "ppo") and config.ppo.reward == "learned"
    validate(config)
