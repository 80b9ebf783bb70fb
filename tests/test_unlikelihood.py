"""The Unlikelihood baseline (`losses.get("unlikelihood")`): hand-computed values, stable
log(1 - p) as p -> 1, masked slots, its effect on a tiny model, and a DPO-stage run from the
command-line overrides that holds no reference."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_loop import load_config, read_metrics
from test_reference_free import _first_step
from train_testlib import (
    SGD,
    assert_trees_close,
    grads_of,
    random_pairs,
    random_params,
    sgd_state,
    tiny_model,
)

from dpo_jax import losses
from dpo_jax import main as main_lib
from dpo_jax.data.batching import pad_pairs
from dpo_jax.data.examples import TokenizedPair
from dpo_jax.losses.token_level import MAX_TOKEN_LOGP, log1m_prob
from dpo_jax.train import state as train_state
from dpo_jax.train import steps
from dpo_jax.train.scoring import Scoring

UL = losses.get("unlikelihood")


def _logps(chosen, rejected_tokens, mask):
    rejected_tokens = jnp.asarray(rejected_tokens, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    return losses.PreferenceLogps(
        chosen_logps=jnp.asarray(chosen, jnp.float32),
        rejected_logps=jnp.where(mask > 0, rejected_tokens, 0.0).sum(-1),
        rejected_token_logps=rejected_tokens,
        rejected_loss_mask=mask,
    )


def test_registered_as_a_reference_free_loss_with_alpha():
    assert "unlikelihood" in losses.names()
    assert not losses.requires_reference("unlikelihood")
    assert UL.hparams == {"alpha": 1.0}
    assert {"rejected_token_logps", "rejected_loss_mask"} <= set(UL.needs)
    assert steps.Objective.create("unlikelihood", 0.1, {"alpha": 0.1}).per_token


def test_hand_computed_values():
    # Pair 0: rejected tokens p = 0.5, 0.25 (third slot masked); pair 1: p = 0.9.
    lp = _logps(
        [-2.0, -3.0],
        [[math.log(0.5), math.log(0.25), -1.0], [math.log(0.9), -5.0, -5.0]],
        [[1, 1, 0], [1, 0, 0]],
    )
    out = UL(lp, beta=0.1, alpha=0.5)
    term0 = math.log(0.5) + math.log(0.75)
    term1 = math.log(0.1)
    np.testing.assert_allclose(out.terms["unlikelihood"], [term0, term1], rtol=1e-6)
    np.testing.assert_allclose(out.losses, [2.0 - 0.5 * term0, 3.0 - 0.5 * term1], rtol=1e-6)
    # Rewards as the other reference-free losses: beta * policy log-prob sums.
    np.testing.assert_allclose(out.chosen_rewards, [-0.2, -0.3], rtol=1e-6)
    np.testing.assert_allclose(
        out.rejected_rewards, [0.1 * (math.log(0.5) + math.log(0.25)), 0.1 * math.log(0.9)]
    )
    # alpha = 0 is plain chosen NLL (a sum over tokens, not a mean).
    np.testing.assert_allclose(UL(lp, beta=0.1, alpha=0.0).losses, [2.0, 3.0])


def test_log1m_prob_matches_float64_on_both_branches():
    x = np.array([-1e4, -80.0, -20.0, -2.0, -0.7, -0.69, -1e-3, -1e-6], np.float32)
    want = np.log1p(-np.exp(x.astype(np.float64)))
    np.testing.assert_allclose(log1m_prob(jnp.asarray(x)), want, rtol=2e-6)


@pytest.mark.parametrize("logp", [0.0, -1e-30, -1e-9, MAX_TOKEN_LOGP])
def test_p_near_one_gives_a_large_finite_penalty_and_gradient(logp):
    def loss(token_logps):
        return UL(_logps([-1.0], token_logps, [[1.0]]), beta=0.1, alpha=1.0).losses.sum()

    value, grad = jax.value_and_grad(loss)(jnp.array([[logp]], jnp.float32))
    cap = -math.log(-math.expm1(MAX_TOKEN_LOGP))  # 16.118: -log(1 - p) at the cap
    np.testing.assert_allclose(value, 1.0 + cap, rtol=1e-6)
    assert np.isfinite(grad).all()
    # d(-log(1 - e^x))/dx = e^x / (1 - e^x) > 0: gradient descent lowers the log-prob.
    np.testing.assert_allclose(grad[0, 0], 1.0 / -math.expm1(MAX_TOKEN_LOGP), rtol=1e-3)


def test_gradient_through_the_softmax_matches_the_closed_form():
    """-alpha log(1 - p_y) with p = softmax(z): d/dz_y = alpha p_y, d/dz_j = -alpha p_y p_j /
    (1 - p_y); finite (and pushing z_y down) when p_y rounds to 1 in float32."""
    alpha, y = 0.5, 2

    def loss(z):
        token_logp = jax.nn.log_softmax(z)[y]
        return -alpha * log1m_prob(token_logp)

    z = jnp.array([0.3, -1.0, 1.5, 0.2], jnp.float32)
    p = np.asarray(jax.nn.softmax(z), np.float64)
    want = -alpha * p[y] * p / (1.0 - p[y])
    want[y] = alpha * p[y]
    np.testing.assert_allclose(jax.grad(loss)(z), want, rtol=1e-5)
    saturated = jax.grad(loss)(jnp.array([0.0, 0.0, 40.0, 0.0], jnp.float32))
    assert np.isfinite(saturated).all() and saturated[y] >= 0.0


def test_masked_slots_leak_neither_value_nor_nan_gradient():
    clean = jnp.array([[-0.5, -1.0, -1.0, -1.0]], jnp.float32)
    dirty = jnp.array([[-0.5, 0.0, -jnp.inf, jnp.nan]], jnp.float32)
    mask = [[1.0, 0.0, 0.0, 0.0]]

    def loss(token_logps):
        return UL(_logps([-1.0], token_logps, mask), beta=0.1, alpha=1.0).losses.sum()

    np.testing.assert_allclose(loss(dirty), loss(clean))
    grad = jax.grad(loss)(dirty)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[0, 1:], 0.0)


def test_bad_arguments_name_the_loss_and_the_field():
    lp = _logps([-1.0], [[-1.0]], [[1.0]])
    with pytest.raises(ValueError, match="alpha must lie in"):
        UL(lp, beta=0.1, alpha=-0.1)
    with pytest.raises(ValueError, match="'unlikelihood' needs PreferenceLogps.rejected_token"):
        UL(lp._replace(rejected_token_logps=None), beta=0.1)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        UL(lp, beta=0.1, unlikelihood_alpha=0.1)


def _mean_token_probs(model, params, batch):
    """(mean chosen log-prob sum, mean probability of the scored rejected tokens)."""
    stats = Scoring(model).pair_stats(params, batch, batch["pair_mask"].shape[0], per_token=True)
    real = np.asarray(batch["pair_mask"]) != 0
    mask = np.asarray(batch["loss_mask"][:, 1])[real] != 0
    probs = np.exp(np.asarray(stats["token_logps"][:, 1])[real])[mask]
    return float(np.asarray(stats["logps"][:, 0])[real].mean()), float(probs.mean())


TX = optax.adam(1e-2)


@functools.cache
def _step(model, alpha):
    objective = steps.Objective.create("unlikelihood", 0.1, {"alpha": alpha})
    return jax.jit(steps.make_dpo_step(model=model, tx=TX, objective=objective))


def _train(model, params, batch, alpha, num_steps):
    step = _step(model, alpha)
    state = train_state.state_from_params(params, TX, jax.random.PRNGKey(0))
    for _ in range(num_steps):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    return state.params


def test_training_pushes_the_rejected_tokens_down_and_the_chosen_response_up():
    """From a model taught the rejected responses (so their tokens start likely), alpha = 1
    lowers their probability well below where the chosen NLL alone (alpha = 0) leaves it,
    while the chosen log-prob rises."""
    model = tiny_model()
    pairs = random_pairs(4, seed=3)
    batch = pad_pairs(pairs, max_length=16, batch_size=4)
    swapped = [TokenizedPair(p.prompt_ids, p.rejected_ids, p.chosen_ids) for p in pairs]
    start = _train(
        model, random_params(model, 0), pad_pairs(swapped, max_length=16, batch_size=4), 0.0, 30
    )
    chosen0, rejected0 = _mean_token_probs(model, start, batch)
    assert rejected0 > 0.3  # the rejected tokens are likely to begin with
    chosen_ul, rejected_ul = _mean_token_probs(model, _train(model, start, batch, 1.0, 10), batch)
    _, rejected_nll = _mean_token_probs(model, _train(model, start, batch, 0.0, 10), batch)
    assert chosen_ul > chosen0 + 1.0
    assert rejected_ul < 0.5 * rejected0
    assert rejected_ul < rejected_nll - 0.05


def test_a_dpo_stage_run_from_command_line_overrides_trains_it_without_a_reference(
    tmp_path, monkeypatch
):
    config = main_lib.apply_overrides(
        load_config("dpo"),
        {"dpo.loss.name": "unlikelihood", "dpo.loss.hparams.alpha": 0.1, "dpo.steps": 2},
    )
    workdir = str(tmp_path / "ul")
    seen = _first_step(config, workdir, monkeypatch)
    assert seen["reference"] is None and "ref_logps" not in seen["batch"]
    rows = [m for m in read_metrics(workdir) if "loss" in m]
    assert len(rows) == 2
    for m in rows:
        # The step's mean loss is the mean of its two reported parts.
        np.testing.assert_allclose(
            m["loss"], -(m["logps/chosen"] + 0.1 * m["terms/unlikelihood"]), rtol=1e-4
        )
        assert m["terms/unlikelihood"] < 0.0
    assert any("eval/terms/unlikelihood" in m for m in read_metrics(workdir))


def test_accumulated_step_equals_the_one_big_batch_step():
    """Per-token fields and the reported term go through gradient accumulation unchanged."""
    model = tiny_model()
    batch = pad_pairs(random_pairs(5, seed=1), max_length=16, batch_size=8)
    objective = steps.Objective.create("unlikelihood", 0.1, {"alpha": 0.5})
    state = sgd_state(random_params(model, 0))
    make = functools.partial(steps.make_dpo_step, model=model, tx=SGD, objective=objective)
    (one, m1), (four, m4) = (jax.jit(make(accum_steps=a))(state, batch) for a in (1, 4))
    for key in ("loss", "terms/unlikelihood", "logps/chosen"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5)
    assert_trees_close(grads_of(state, four), grads_of(state, one), rtol=1e-4, atol=1e-6)
