"""DPO steps and evaluation on a tiny model: one concatenated forward, reference handling
(frozen, cached, none), packed = padded, the non-finite guard, errors, and learning.

Gradients are read off one SGD step (new params = params - grads), so every comparison goes
through the public step functions. Accumulation, data parallelism and SFT:
test_train_accumulation.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as lib

from dpo_jax import logprobs, losses
from dpo_jax.train import scoring, steps, toy
from dpo_jax.train import state as train_state

DPO = steps.Objective.create()

L = lib.L
# Fixtures model, policy, reference, padded, packed: tests/train_testlib.py.


@pytest.fixture(scope="module")
def score(model):
    """Jitted `pair_logps`, shared so that each batch layout compiles once."""
    return jax.jit(lambda p, b: scoring.pair_logps(p, b, model=model))


@pytest.fixture(scope="module")
def sigmoid_step(model):
    """The plain DPO step, shared by the tests that run it on cached-reference batches."""
    return lib.dpo_step(model)


@pytest.fixture(scope="module")
def baseline(model, policy, reference, padded):
    """One frozen-reference step on the padded batch, state donated as in training:
    (grads, metrics, reference before the step)."""
    reference_before = jax.tree.map(np.array, reference)
    state = lib.sgd_state(jax.tree.map(jnp.copy, policy))  # donated below
    params_before = jax.tree.map(np.array, state.params)
    step = jax.jit(steps.make_dpo_step(model=model, tx=lib.SGD), donate_argnums=(0,))
    new_state, metrics = step(state, padded, reference)
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), params_before, new_state.params)
    return grads, metrics, reference_before


def _separate_logps(model, params, batch):
    """Per-pair sums from two separate forwards (chosen rows, rejected rows)."""
    sides = []
    for p in range(2):
        logits = model.apply(
            {"params": params}, batch["tokens"][:, p], positions=batch["positions"][:, p],
            segment_ids=batch["segment_ids"][:, p],
        )  # fmt: skip
        tok = logprobs.token_logps(logits, batch["tokens"][:, p])
        sides.append(logprobs.masked_sum(tok, batch["loss_mask"][:, p]))
    return jnp.stack(sides, axis=1)


def test_concatenated_forward_equals_separate_forwards(model, policy, padded, baseline, score):
    got = score(policy, padded)
    want = jax.jit(lambda p, b: _separate_logps(model, p, b))(policy, padded)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    real = padded["pair_mask"] == 1
    _, metrics, _ = baseline
    np.testing.assert_allclose(metrics["logps/chosen"], want[real, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"], want[real, 1].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["logps/accuracies"], (want[real, 0] > want[real, 1]).mean(), rtol=1e-6
    )
    assert float(metrics["pairs"]) == 5
    assert float(metrics["tokens"]) == padded["loss_mask"][real].sum()


class _CountingModel:
    """Records the row shapes of every `apply` call (at trace time)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def apply(self, variables, tokens, **kwargs):
        self.calls.append(tuple(tokens.shape))
        return self.model.apply(variables, tokens, **kwargs)


def test_policy_runs_one_forward_over_both_sides(model, policy, reference, padded):
    counting = _CountingModel(model)
    cached = {**padded, "ref_logps": np.zeros((8, 2), np.float32)}
    loss = functools.partial(steps.preference_loss, model=counting, objective=DPO)
    jax.eval_shape(lambda p, b: loss(p, None, b), policy, cached)
    assert counting.calls == [(16, L)]  # [2B, L]: chosen and rejected rows together
    counting.calls.clear()
    jax.eval_shape(loss, policy, reference, padded)
    assert counting.calls == [(16, L), (16, L)]  # reference, then policy


def test_reference_gets_zero_gradient_and_is_not_modified(
    model, policy, reference, padded, baseline
):
    loss = lambda p, r, b: steps.preference_loss(p, r, b, model=model, objective=DPO)[0]
    policy_grads, ref_grads = jax.jit(jax.grad(loss, (0, 1)))(policy, reference, padded)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(ref_grads))
    # The same gradient as the step's (which never differentiates the reference at all).
    lib.assert_trees_close(policy_grads, baseline[0])
    # The step (state donated) left the reference as it was.
    _, metrics, reference_before = baseline
    assert float(metrics["rewards/margins"]) != 0  # the reference differs from the policy
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, reference), reference_before
    )


def test_cached_reference_equals_frozen_reference(
    policy, reference, padded, baseline, score, sigmoid_step
):
    cached = {**padded, "ref_logps": np.asarray(score(reference, padded))}
    state = lib.sgd_state(policy)
    new_state, metrics = sigmoid_step(state, cached, None)
    grads, want, _ = baseline
    lib.assert_trees_close(lib.grads_of(state, new_state), grads)
    for name in want:
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_packed_batch_equals_padded_batch(model, policy, reference, packed, baseline):
    state = lib.sgd_state(policy)
    new_state, metrics = lib.dpo_step(model)(state, packed, reference)
    grads, want, _ = baseline
    lib.assert_trees_close(lib.grads_of(state, new_state), grads, rtol=1e-5, atol=1e-6)
    for name in want:
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_nonfinite_guard_keeps_params_and_counts(policy, padded, sigmoid_step):
    state = lib.sgd_state(policy)
    ref_logps = np.zeros((8, 2), np.float32)
    bad = {**padded, "ref_logps": ref_logps.copy()}
    bad["ref_logps"][0, 0] = np.nan
    new_state, metrics = sigmoid_step(state, bad, None)
    assert float(metrics["nonfinite_steps"]) == 1
    assert not np.isfinite(float(metrics["loss"]))
    assert int(new_state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, state.opt_state)
    # A finite batch afterwards updates params and the momentum trace normally.
    newer, metrics = sigmoid_step(new_state, {**padded, "ref_logps": ref_logps}, None)
    assert float(metrics["nonfinite_steps"]) == 0 and int(newer.step) == 2
    for new, old in [(newer.params, state.params), (newer.opt_state, state.opt_state)]:
        leaves = zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
        assert any(np.any(a != b) for a, b in leaves)


def test_step_keys_are_never_reused(policy):
    state = lib.sgd_state(policy)
    keys = {tuple(np.asarray(train_state.step_key(state.replace(step=jnp.int32(t))))) for t in
            range(100)}  # fmt: skip
    assert len(keys) == 100 and tuple(np.asarray(state.rng)) not in keys


@pytest.mark.parametrize("vocab_chunk_size", [None, 24])
def test_memory_efficient_logps_match(model, policy, padded, score, vocab_chunk_size):
    # Vocabulary blocks of 24 do not divide the 64-token vocabulary: a ragged last block.
    options = scoring.ScoringOptions(True, chunk_size=5, vocab_chunk_size=vocab_chunk_size)
    plain = score(policy, padded)
    fast = jax.jit(lambda p, b: scoring.pair_logps(p, b, model=model, options=options))(
        policy, padded
    )
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(plain)[5:] == 0) and np.all(np.asarray(plain)[:5] < 0)


def test_eval_step_matches_train_metrics(model, policy, reference, padded, baseline):
    metrics = jax.jit(steps.make_eval_step(model=model))(policy, padded, reference)
    _, want, _ = baseline
    update_metrics = {"grad_norm", "update_norm", "nonfinite_steps", "rejected_steps"}
    assert set(metrics) == set(want) - update_metrics
    for name in metrics:
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-6, err_msg=name)


def _wpo():
    return steps.Objective.create(losses.build("sigmoid", use_weighting=True))


def test_errors_are_clear(model, policy, reference, padded, packed):
    shapes = jax.eval_shape
    state = lib.sgd_state(policy)
    step = steps.make_dpo_step(model=model, tx=lib.SGD)
    with pytest.raises(ValueError, match="needs a reference"):
        shapes(step, state, padded, None)
    with pytest.raises(ValueError, match="both reference params and batch"):
        shapes(step, state, {**padded, "ref_logps": np.zeros((8, 2), np.float32)}, reference)
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['pair_mask'\]"):
        shapes(step, state, {k: v for k, v in padded.items() if k != "pair_mask"}, reference)
    with pytest.raises(ValueError, match="field 'loss_mask' has shape"):
        shapes(step, state, {**padded, "loss_mask": padded["loss_mask"][:, :, :-1]}, reference)
    with pytest.raises(ValueError, match="accum_steps=3 must divide"):
        three = steps.make_dpo_step(model=model, tx=lib.SGD, accum_steps=3)
        shapes(three, state, padded, reference)
    with pytest.raises(ValueError, match="packed batches do not provide"):
        wpo = steps.make_dpo_step(model=model, tx=lib.SGD, objective=_wpo())
        shapes(wpo, state, packed, reference)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        steps.Objective.create("sigmoid", hparams={"label_smothing": 0.1})
    with pytest.raises(ValueError, match="unknown loss"):
        steps.Objective.create("sigmiod")
    with pytest.raises(ValueError, match="beta must be > 0"):
        steps.Objective.create("sigmoid", beta=0.0)
    # A reference-free loss needs none.
    simpo = steps.Objective.create("simpo")
    free = steps.make_dpo_step(model=model, tx=lib.SGD, objective=simpo)
    assert shapes(free, state, padded, None)[1]["loss"].shape == ()


def test_per_token_loss_runs_on_padded_batches(model, policy, reference, padded):
    # WPO needs per-token policy log-probs and log sum_v p(v)^2 (from the full logits).
    evaluate = steps.make_eval_step(model=model, objective=_wpo())
    assert jax.eval_shape(evaluate, policy, padded, reference)["loss"].shape == ()


def test_dpo_learns_a_separable_toy_set(model):
    history = toy.train_on_pairs(
        model, lib.random_params(model, 2), toy.marker_pairs(256, seed=1),
        toy.marker_pairs(64, seed=2), loss_name="sigmoid", num_steps=40, eval_every=40,
    )  # fmt: skip
    first, last = history["eval"][0], history["eval"][-1]
    assert 0.2 < first["policy_accuracy"] < 0.8
    assert first["rewards/accuracies"] == 0  # policy == reference: all implicit rewards tie
    assert last["policy_accuracy"] > 0.9 and last["rewards/accuracies"] > 0.9
    assert last["loss"] < first["loss"] - 0.1


def test_loss_curve_of_dpo_is_the_logistic_loss_and_weight():
    m = np.linspace(-30.0, 30.0, 13)
    curve = toy.loss_curve("sigmoid", m, beta=0.1)
    h = 0.1 * m
    np.testing.assert_allclose(curve["reward_margin"], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curve["loss"], np.log1p(np.exp(-h)), rtol=1e-5)
    np.testing.assert_allclose(curve["weight"], 1 / (1 + np.exp(h)), rtol=1e-4)
    with pytest.raises(ValueError, match=">= 2 values"):
        toy.loss_curve("sigmoid", [1.0])


def test_state_from_params_is_pure_and_checkpointable(policy):
    from dpo_jax.train import optimizers

    tx = optimizers.make_optimizer({"name": "adamw", "learning_rate": 1e-3})
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):  # typed or raw keys
        state = jax.eval_shape(lambda p, k: train_state.state_from_params(p, tx, k), policy, key)
        assert state.step.shape == () and state.step.dtype == jnp.int32
        assert state.rng.shape == (2,) and state.rng.dtype == jnp.uint32  # checkpointable
        assert jax.tree.structure(state.params) == jax.tree.structure(policy)
