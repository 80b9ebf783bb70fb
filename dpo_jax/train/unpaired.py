"""The unpaired (KTO) objective and its jitted step: one completion per example, labelled
desirable or undesirable (TRL's `KTOTrainer`).

Batches: `dpo_jax.data.batching.pad_unpaired`, `[B, 2, L]` with side 0 = the example
(x_i, y_i) and side 1 = its KL sequence (x_i, y_{i-1}), `labels: [B]`, `pair_mask: [B]`.

One step, for a batch of B examples:
  1. constants, forward only (micro-batched like the update): the reference's log-prob sums
     of the examples `[B]`, and on the KL sequences the policy's minus the reference's `[B]`
     (the policy under `stop_gradient`: TRL computes them under `no_grad`, and no gradient
     flows through KTO's baseline).
  2. KTO's KL baseline z_0 = max(0, mean of those differences over the real examples of the
     global batch). TRL averages per-device means (`gather_for_metrics(kl).mean()`), the
     same number when the devices hold equally many real examples.
  3. loss: the registered unpaired loss (`kto`, `apo_zero_unpaired`) with z_0 fixed,
     averaged over the real examples (TRL: `losses.nanmean()` over desirable and
     undesirable examples). With z_0 a constant the per-example losses add up over
     micro-batches, so accumulation is exact in one pass.
  4. update: `steps.apply_gradients`, the same guard as the DPO step.

Metrics (TRL's KTOTrainer names): `loss`, `kl` (z_0), `rewards/chosen`, `logps/chosen`
(means over the desirable examples), `rewards/rejected`, `logps/rejected` (undesirable),
`rewards/margins` (chosen minus rejected mean reward), `count/chosen`, `count/rejected`,
`examples` (real examples), `tokens` (scored completion tokens), and the update metrics
of `steps.apply_gradients`. Rewards are `beta * (logp - ref_logp)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dpo_jax import logprobs, losses
from dpo_jax.data.batching import ROW_FIELDS, check_unpaired_batch
from dpo_jax.models.lora import LoraConfig
from dpo_jax.train.scoring import DEFAULT_SCORING, Scoring, ScoringOptions
from dpo_jax.train.state import TrainState, step_key
from dpo_jax.train.steps import (
    DEFAULT_GUARD,
    Guard,
    _check_accum,
    _micro_keys,
    _psum,
    apply_gradients,
    lora_policy,
    split_micro_batches,
)

Batch = Mapping[str, jax.Array]
SIDES = ("chosen", "rejected")  # TRL's names for desirable and undesirable examples
COUNT_KEYS = ("examples", "count/chosen", "count/rejected", "tokens")
# What each mean is over, for averaging held-out batches (other means: over `examples`).
MEAN_WEIGHTS = {f"{k}/{side}": f"count/{side}" for k in ("rewards", "logps") for side in SIDES}


@dataclasses.dataclass(frozen=True)
class UnpairedObjective:
    """An unpaired loss with its beta and hyperparameters (static). Build it with `create`."""

    loss: losses.Loss
    beta: float
    hparams: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def create(
        cls, loss: str = "kto", beta: float = 0.1, hparams: Mapping[str, Any] | None = None
    ) -> UnpairedObjective:
        loss = losses.get(loss)
        if loss.name not in losses.unpaired_names():
            raise ValueError(
                f"loss {loss.name!r} is not unpaired; expected one of {losses.unpaired_names()}"
            )
        hparams = dict(hparams or {})
        loss.check_hparams(hparams, float(beta))
        return cls(loss, float(beta), tuple(sorted(hparams.items())))

    @property
    def uses_kl(self) -> bool:
        """Whether the loss reads KTO's KL baseline (APO-zero-unpaired does not)."""
        return "kl" in self.loss.needs


def sequence_logps(scoring: Scoring, params, batch: Batch, side: int, rngs=None) -> jax.Array:
    """Log-prob sums `[B]` float32 of one side of an unpaired batch (0 = the examples, 1 = the
    KL sequences)."""
    rows = [batch[f][:, side] for f in ROW_FIELDS[:3]]
    mask = batch["loss_mask"][:, side]
    token_logps, _ = scoring.token_logps(params, *rows, rngs=rngs, loss_mask=mask)
    return logprobs.masked_sum(token_logps, mask)


def _constants(scoring: Scoring, objective: UnpairedObjective, params, reference, batch):
    """(reference sums of the examples [b], KL-sequence log-ratios [b] or None)."""
    ref = sequence_logps(scoring, reference, batch, 0)
    if not objective.uses_kl:
        return ref, None
    kl = sequence_logps(scoring, params, batch, 1) - sequence_logps(scoring, reference, batch, 1)
    return ref, kl


def batch_constants(scoring, objective, params, reference, batch, accum_steps, axis_name):
    """(reference sums of the examples `[B]`, z_0 scalar), without gradients."""
    params, reference = lax.stop_gradient((params, reference))
    if accum_steps == 1:
        ref, kl = _constants(scoring, objective, params, reference, batch)
    else:  # one micro-batch at a time, as the update: the memory of one forward
        micro, _ = split_micro_batches(batch, accum_steps, packed=False)
        ref, kl = lax.map(lambda mb: _constants(scoring, objective, params, reference, mb), micro)
        ref, kl = ref.reshape(-1), None if kl is None else kl.reshape(-1)
    if kl is None:
        return ref, jnp.float32(0)
    real = batch["pair_mask"] != 0
    total = _psum(jnp.where(real, kl, 0.0).sum(), axis_name)
    count = _psum(real.sum().astype(jnp.float32), axis_name)
    return ref, jnp.maximum(total / jnp.maximum(count, 1.0), 0.0)


def unpaired_sums(objective, logps, ref_logps, z0, batch) -> tuple[jax.Array, dict]:
    """(sum of the losses over real examples, metric sums) of one (micro-)batch."""
    lp = losses.UnpairedLogps(logps, ref_logps, batch["labels"] != 0, z0)
    out = objective.loss(lp, beta=objective.beta, **dict(objective.hparams))
    real = batch["pair_mask"] != 0
    desirable, undesirable = real & lp.labels, real & ~lp.labels

    def total(x, where):
        return jnp.where(where, lax.stop_gradient(x).astype(jnp.float32), 0.0).sum()

    sums = {
        "rewards/chosen": total(out.rewards, desirable),
        "rewards/rejected": total(out.rewards, undesirable),
        "logps/chosen": total(logps, desirable),
        "logps/rejected": total(logps, undesirable),
        "count/chosen": desirable.sum().astype(jnp.float32),
        "count/rejected": undesirable.sum().astype(jnp.float32),
        "examples": real.sum().astype(jnp.float32),
        "tokens": total(logprobs.token_counts(batch["loss_mask"][:, 0]), real),
    }
    return jnp.where(real, out.losses, 0.0).sum(), sums


def _means(loss, z0, sums: dict, axis_name) -> dict:
    sums = _psum(sums, axis_name)
    metrics = {"loss": loss, "kl": z0}
    for side in SIDES:
        n = jnp.maximum(sums[f"count/{side}"], 1.0)
        metrics[f"rewards/{side}"] = sums[f"rewards/{side}"] / n
        metrics[f"logps/{side}"] = sums[f"logps/{side}"] / n
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return {**metrics, **{k: sums[k] for k in COUNT_KEYS}}


def unpaired_grads(
    params, reference, batch, key, *, scoring, objective, accum_steps, axis_name, to_policy=None
):
    """(grads, loss, z_0, metric sums) of the mean loss over the real examples of the global
    batch; grads and loss are this device's share (to be psum'ed over `axis_name`).
    to_policy: trained params -> the model's params (LoRA: `lora.merge` into the base)."""
    to_policy = to_policy or (lambda p: p)
    policy = to_policy(params)
    ref, z0 = batch_constants(scoring, objective, policy, reference, batch, accum_steps, axis_name)
    norm = jnp.maximum(_psum((batch["pair_mask"] != 0).sum().astype(jnp.float32), axis_name), 1.0)
    batch = {**batch, "ref_example_logps": ref}

    def micro_loss(p, mb, k):
        logps = sequence_logps(scoring, to_policy(p), mb, 0, rngs={"dropout": k})
        loss_sum, sums = unpaired_sums(objective, logps, mb["ref_example_logps"], z0, mb)
        return loss_sum / norm, sums

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)
    if accum_steps == 1:
        (loss, sums), grads = value_and_grad(params, batch, jax.random.fold_in(key, 0))
        return grads, loss, z0, sums
    micro, _ = split_micro_batches(batch, accum_steps, packed=False)

    def accumulate(carry, xs):
        return jax.tree.map(jnp.add, carry, value_and_grad(params, *xs)), None

    zero_sums = {k: jnp.float32(0) for k in (*MEAN_WEIGHTS, *COUNT_KEYS)}
    init = ((jnp.float32(0), zero_sums), jax.tree.map(jnp.zeros_like, params))
    ((loss, sums), grads), _ = lax.scan(accumulate, init, (micro, _micro_keys(key, accum_steps)))
    return grads, loss, z0, sums


def _unpaired_step(
    state: TrainState, batch: Batch, reference, *, model, tx, objective, scoring, accum_steps,
    axis_name, guard, lora,
) -> tuple[TrainState, dict]:  # fmt: skip
    if reference is None:
        raise ValueError(
            f"loss '{objective.loss.name}' needs the frozen reference params (cached "
            "reference log-probs are not supported for unpaired batches)"
        )
    check_unpaired_batch(batch)
    grads, loss, z0, sums = unpaired_grads(
        state.params, reference, batch, step_key(state), scoring=Scoring(model, scoring),
        objective=objective, accum_steps=accum_steps, axis_name=axis_name,
        to_policy=lora_policy(lora, reference, model),
    )  # fmt: skip
    grads, loss = _psum((grads, loss), axis_name)
    state, update_metrics = apply_gradients(state, grads, loss, tx, guard)
    return state, {**_means(loss, z0, sums, axis_name), **update_metrics}


def make_unpaired_step(
    *,
    model,
    tx: optax.GradientTransformation,
    objective: UnpairedObjective | None = None,
    scoring: ScoringOptions = DEFAULT_SCORING,
    accum_steps: int = 1,
    axis_name: str | None = None,
    guard: Guard = DEFAULT_GUARD,
    lora: LoraConfig | None = None,
):
    """`step(state, batch, reference) -> (state, metrics)`: one optimizer step on an unpaired
    batch (module docstring); pure. `reference`: the frozen reference params (required).
    objective: default `UnpairedObjective.create()` (KTO, beta 0.1, TRL's default).
    accum_steps must divide B. lora: `state.params` are adapters merged into the frozen
    base `reference`, as in `steps.make_dpo_step`."""
    return functools.partial(
        _unpaired_step,
        model=model,
        tx=tx,
        objective=objective or UnpairedObjective.create(),
        scoring=scoring,
        accum_steps=_check_accum(accum_steps),
        axis_name=axis_name,
        guard=guard,
        lora=lora,
    )


def make_unpaired_eval_step(
    *,
    model,
    objective: UnpairedObjective | None = None,
    scoring: ScoringOptions = DEFAULT_SCORING,
    axis_name=None,
    lora: LoraConfig | None = None,
):
    """`evaluate(params, batch, reference) -> metrics`: the step's metrics on a held-out
    batch (z_0 from that batch), without gradients or update metrics."""
    objective = objective or UnpairedObjective.create()

    def evaluate(params, batch, reference=None):
        check_unpaired_batch(batch)
        if lora is not None:
            params = lora_policy(lora, reference, model)(params)
        scorer = Scoring(model, scoring)
        ref, z0 = batch_constants(scorer, objective, params, reference, batch, 1, axis_name)
        logps = sequence_logps(scorer, params, batch, 0)
        loss_sum, sums = unpaired_sums(objective, logps, ref, z0, batch)
        norm = jnp.maximum(_psum(sums["examples"], axis_name), 1.0)
        return _means(_psum(loss_sum, axis_name) / norm, z0, sums, axis_name)

    return evaluate
