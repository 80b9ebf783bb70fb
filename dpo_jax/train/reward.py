"""The reward-model (`rm`) stage's jitted step and held-out evaluation.

`make_rm_step(...)` returns `step(state, batch, reference=None) -> (state, metrics)`,
`make_rm_eval_step(...)` returns `evaluate(params, batch, reference=None) -> metrics`, with
the same calling convention as `steps.make_dpo_step` / `make_eval_step`, so `loop.Stage`
jits or pmaps them the same way. Batches: padded preference batches `[B, 2, L]`
(`dpo_jax.data.batching`; side 0 = chosen); packed batches are refused (`validate`).

One step: ONE forward of `models.reward.RewardModel` over the 2B rows gives rewards `[B, 2]`;
the loss is `models.reward.bradley_terry_loss` averaged over the real pairs of the global
batch (exact under accumulation: each micro-batch adds its loss sum over the global real-pair
count), then the same guarded update as the other stages (`steps.apply_gradients`).

Metrics (means over real pairs): `loss`, `accuracy` (r_c > r_r), `rewards/chosen`,
`rewards/rejected`, `rewards/margins`; counts `tokens` (real tokens of real pairs) and
`pairs`; the step adds `grad_norm`, `update_norm`, `nonfinite_steps`, `rejected_steps`,
`learning_rate`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from dpo_jax.data.batching import ROW_FIELDS, check_preference_batch, is_packed
from dpo_jax.models.reward import bradley_terry_loss
from dpo_jax.train.state import TrainState, step_key
from dpo_jax.train.steps import (
    DEFAULT_GUARD,
    Batch,
    Guard,
    _check_accum,
    _means,
    _micro_keys,
    _psum,
    apply_gradients,
    split_micro_batches,
)

SUM_KEYS = ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "tokens", "pairs")


@dataclasses.dataclass(frozen=True)
class RewardObjective:
    """The Bradley-Terry loss's options (static). center_rewards_coefficient: TRL's
    centring weight (0 = off)."""

    center_rewards_coefficient: float = 0.0

    def rewards(self, model, params, batch: Batch, key=None) -> jax.Array:
        """Rewards [B, 2] float32 (0 = chosen) from one forward over the 2B rows."""
        if is_packed(batch):
            raise ValueError("the reward-model step takes padded batches [B, 2, L], not packed")
        tokens = batch["tokens"]
        rows = [batch[f].reshape(-1, tokens.shape[-1]) for f in ROW_FIELDS[:3]]
        rngs = None if key is None else {"dropout": key}
        out = model.apply({"params": params}, *rows, rngs=rngs)
        return out.reshape(tokens.shape[:2])

    def sums(self, rewards: jax.Array, batch: Batch) -> tuple[jax.Array, dict]:
        """(sum of the per-pair losses over real pairs, metric sums over real pairs)."""
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        losses = bradley_terry_loss(
            chosen, rejected, center_rewards_coefficient=self.center_rewards_coefficient
        )
        real = batch["pair_mask"] != 0

        def total(x):
            return jnp.where(real, lax.stop_gradient(x).astype(jnp.float32), 0.0).sum()

        tokens = (batch["segment_ids"] != 0).sum(axis=(1, 2))
        metrics = {
            "accuracy": total(chosen > rejected),
            "rewards/chosen": total(chosen),
            "rewards/rejected": total(rejected),
            "rewards/margins": total(chosen - rejected),
            "tokens": total(tokens),
            "pairs": total(jnp.ones_like(chosen)),
        }
        return jnp.where(real, losses, 0.0).sum(), metrics

    def normalizer(self, batch: Batch, axis_name) -> jax.Array:
        count = (batch["pair_mask"] != 0).sum().astype(jnp.float32)
        return jnp.maximum(_psum(count, axis_name), 1.0)


def _rm_step(
    state: TrainState,
    batch: Batch,
    reference=None,
    *,
    model,
    tx,
    objective: RewardObjective,
    accum_steps: int,
    axis_name,
    guard: Guard,
) -> tuple[TrainState, dict]:
    if reference is not None:
        raise ValueError("the reward-model step takes no reference model (pass reference=None)")
    check_preference_batch(batch)
    norm, key = objective.normalizer(batch, axis_name), step_key(state)

    def micro_loss(params, mb, k):
        loss_sum, sums = objective.sums(objective.rewards(model, params, mb, k), mb)
        return loss_sum / norm, sums

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)
    if accum_steps == 1:
        (loss, sums), grads = value_and_grad(state.params, batch, jax.random.fold_in(key, 0))
    else:
        micro, _ = split_micro_batches(batch, accum_steps, packed=False)

        def accumulate(carry, xs):
            return jax.tree.map(jnp.add, carry, value_and_grad(state.params, *xs)), None

        zero_sums = {k: jnp.float32(0) for k in SUM_KEYS}
        init = ((jnp.float32(0), zero_sums), jax.tree.map(jnp.zeros_like, state.params))
        ((loss, sums), grads), _ = lax.scan(
            accumulate, init, (micro, _micro_keys(key, accum_steps))
        )
    grads, loss = _psum((grads, loss), axis_name)
    state, update_metrics = apply_gradients(state, grads, loss, tx, guard)
    return state, {**_means(loss, sums, axis_name), **update_metrics}


def make_rm_step(
    *,
    model,
    tx,
    objective: RewardObjective | None = None,
    accum_steps: int = 1,
    axis_name: str | None = None,
    guard: Guard = DEFAULT_GUARD,
):
    """`step(state, batch, reference=None) -> (state, metrics)`: one Bradley-Terry step of
    a `RewardModel`; pure. accum_steps must divide B; reference must be None."""
    return functools.partial(
        _rm_step,
        model=model,
        tx=tx,
        objective=objective or RewardObjective(),
        accum_steps=_check_accum(accum_steps),
        axis_name=axis_name,
        guard=guard,
    )


def make_rm_eval_step(*, model, objective: RewardObjective | None = None, axis_name=None):
    """`evaluate(params, batch, reference=None) -> metrics`: the step's metrics on a
    held-out batch (held-out pair accuracy is `accuracy`), no gradients."""
    objective = objective or RewardObjective()

    def evaluate(params, batch, reference=None):
        check_preference_batch(batch)
        loss_sum, sums = objective.sums(objective.rewards(model, params, batch), batch)
        loss = _psum(loss_sum, axis_name) / objective.normalizer(batch, axis_name)
        return _means(loss, sums, axis_name)

    return evaluate
