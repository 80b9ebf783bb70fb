"""Gradient accumulation, data-parallel reduction and the SFT step: each must give the
gradient and metrics of one big batch (mean over the real pairs / tokens of all of it)."""

import jax
import numpy as np
import pytest
import train_testlib as lib

from dpo_jax import logprobs
from dpo_jax.data.batching import pad_sequences
from dpo_jax.data.examples import TokenizedSequence
from dpo_jax.train import steps

L = lib.L
# Fixtures model, policy, reference, padded, packed: tests/train_testlib.py.


def _big_batch(model, loss_name):
    """(loss, metrics), grads of `preference_loss` on the whole batch, jitted."""
    objective = steps.Objective.create(loss_name)
    loss = lambda p, r, b: steps.preference_loss(p, r, b, model=model, objective=objective)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def whole(model, policy, reference, padded):
    (_, metrics), grads = _big_batch(model, "sigmoid")(policy, reference, padded)
    return grads, metrics


def _check(new_state, state, metrics, grads, want):
    lib.assert_trees_close(lib.grads_of(state, new_state), grads, rtol=2e-5, atol=1e-6)
    for name in want:
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_accumulation_equals_one_big_batch(model, policy, reference, padded, packed, whole,
                                           layout):  # fmt: skip
    batch = padded if layout == "padded" else packed
    if layout == "packed":  # some pair's two sequences sit in different micro-batches
        micro_of = lambda s: set(np.nonzero((batch["slot_ids"] == s).any(1))[0] // 2)
        assert any(micro_of(2 * b) != micro_of(2 * b + 1) for b in range(5))
    state = lib.sgd_state(policy)
    new_state, metrics = lib.dpo_step(model, accum_steps=4)(state, batch, reference)
    _check(new_state, state, metrics, *whole)


def test_accumulation_of_a_batch_mixing_loss(model, policy, reference, padded):
    # AOT sorts the batch: entries are not per-pair, so this takes the two-pass path.
    (_, want), grads = _big_batch(model, "aot")(policy, reference, padded)
    state = lib.sgd_state(policy)
    new_state, metrics = lib.dpo_step(model, loss="aot", accum_steps=4)(state, padded, reference)
    _check(new_state, state, metrics, grads, want)


def test_axis_name_reduction_matches_one_big_batch(model, policy, reference, padded, whole):
    # Two data-parallel shards with 4 and 1 real pairs: psum of sums / psum of counts, not a
    # mean of means. vmap with an axis name runs the same collectives as pmap, in one program.
    step = jax.jit(
        jax.vmap(
            steps.make_dpo_step(model=model, tx=lib.SGD, axis_name="batch"),
            axis_name="batch",
        )
    )
    state = lib.sgd_state(policy)
    two = lambda x: np.stack([x, x])
    split = jax.tree.map(lambda x: x.reshape(2, -1, *x.shape[1:]), padded)
    new_state, metrics = step(jax.tree.map(two, state), split, jax.tree.map(two, reference))
    for shard in range(2):
        shard_metrics = {k: v[shard] for k, v in metrics.items()}
        _check(jax.tree.map(lambda x, s=shard: x[s], new_state), state, shard_metrics, *whole)


def test_sft_step_is_the_token_mean_nll_and_accumulates(model, policy):
    rng = np.random.default_rng(3)
    seqs = [
        TokenizedSequence([1, *rng.integers(3, 60, n).tolist()], rng.integers(3, 60, m).tolist())
        for n, m in [(2, 5), (1, 9), (3, 2)]
    ]
    batch = pad_sequences(seqs, max_length=L, batch_size=4)  # 4th row: padding (example_mask)

    def nll(p, b):
        token_logps = logprobs.token_logps(model.apply({"params": p}, b["tokens"]), b["tokens"])
        return -logprobs.masked_sum(token_logps, b["loss_mask"]).sum() / b["loss_mask"].sum()

    want_loss, want_grads = jax.jit(jax.value_and_grad(nll))(policy, batch)
    state = lib.sgd_state(policy)
    for accum_steps in (1, 2):
        step = jax.jit(steps.make_sft_step(model=model, tx=lib.SGD, accum_steps=accum_steps))
        new_state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
        assert float(metrics["tokens"]) == 16 and float(metrics["nonfinite_steps"]) == 0
        lib.assert_trees_close(lib.grads_of(state, new_state), want_grads, rtol=2e-5, atol=1e-7)
