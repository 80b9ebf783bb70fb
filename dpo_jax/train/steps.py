"""The jitted train steps: DPO (any registered preference loss), SFT, evaluation.

Each step is a pure function; `make_dpo_step(...)` / `make_sft_step(...)` /
`make_eval_step(...)` bind the static parts (model, optimizer, loss, accumulation) and
return `step(state, batch, reference) -> (state, metrics)` (eval: `(params, batch,
reference) -> metrics`), which the caller jits with shardings and a donated state
(`dpo_jax.parallel.jit_step`) or pmaps (`parallel.pmap_step`, `grad_reduce_axis="batch"`).

One DPO step, for a batch of B pairs (padded `[B, 2, L]` or packed `[R, L]`, see
`dpo_jax.data.batching`):
  1. policy: ONE forward over all sequences. Padded `[B, 2, L]` is viewed as `[2B, L]`
     (row 2b + side: a pair's two rows stay on the same batch shard); packed rows are used
     as they are and `slot_ids` map tokens to pair slots (`logprobs.pair_sums`).
  2. reference: frozen params (forward under `stop_gradient`, never differentiated), or
     cached sums `batch["ref_logps"]: [B, 2]`, or none for reference-free losses.
  3. loss: `losses.get(loss)(PreferenceLogps, beta=..., **hparams)`, averaged over real
     pairs (`pair_mask`) of the whole batch, over all micro-batches and devices.
  4. update: gradients psum'ed over `grad_reduce_axis`, optimizer (clipping inside it),
     and a non-finite guard that keeps params and optimizer state when the loss or the
     gradients are not finite (`metrics["nonfinite_steps"] = 1`).

Gradient accumulation (`accum_steps = A`) splits the batch into A micro-batches inside the
step (`lax.scan`) and gives the gradient of the one-big-batch loss, not a mean of
micro-batch means. Padded batches with a per-pair loss use one pass: each micro-batch
contributes `sum(losses over its real pairs) / (real pairs of the whole batch)`. Packed
batches (a pair's two sequences may sit in different rows, hence in different micro-batches)
and losses that mix pairs (`Loss.per_pair = False`, e.g. AOT's sort) use two passes: a
forward-only pass collects every pair's log-probs, the loss and its cotangents w.r.t. them
are computed for the whole batch, and a second pass backpropagates each micro-batch's share
(one extra forward, exact for any loss).

Metric names follow the DPO reference code / TRL: `loss`, `rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
`logps/rejected` (means over real pairs), plus `logps/accuracies` (fraction of real pairs
whose chosen log-prob exceeds the rejected one under the policy alone), `grad_norm`
(before clipping), `tokens` (scored tokens of real pairs), `pairs`, `learning_rate` (the
rate this update applied; with `make_optimizer`), `nonfinite_steps` (1 or 0).
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

from dpo_jax import losses
from dpo_jax.train.optimizers import learning_rate_from_state
from dpo_jax.train.scoring import (
    ROW_FIELDS,
    Batch,
    Scoring,
    check_preference_batch,
    check_sft_batch,
    is_packed,
    pair_lengths,
    reference_logps,
    sft_mask,
    split_micro_batches,
)
from dpo_jax.train.state import TrainState, step_key

__all__ = [
    "apply_gradients",
    "dpo_loss",
    "dpo_step",
    "eval_step",
    "make_dpo_step",
    "make_eval_step",
    "make_sft_step",
    "preference_grads",
    "reference_logps",
    "sft_step",
]
TOKEN_FIELDS = ("chosen_token_logps", "rejected_token_logps", "chosen_loss_mask",
                "rejected_loss_mask")  # fmt: skip
REF_TOKEN_FIELDS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
SUM_SQ_FIELDS = ("chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs")


# ------------------------------------------------------------------------------------------
# The preference objective
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
    """A preference loss with its hyperparameters and what it needs (static)."""

    loss: losses.Loss
    beta: float
    hparams: tuple[tuple[str, Any], ...] = ()

    @property
    def per_token(self) -> bool:
        return any(f in self.loss.needs for f in TOKEN_FIELDS + REF_TOKEN_FIELDS + SUM_SQ_FIELDS)

    @property
    def ref_per_token(self) -> bool:
        return any(f in self.loss.needs for f in REF_TOKEN_FIELDS)

    @property
    def sum_sq(self) -> bool:
        return any(f in self.loss.needs for f in SUM_SQ_FIELDS)

    def check(self, batch: Batch, reference) -> None:
        """Trace-time checks: which reference, and whether the batch layout suffices."""
        name = self.loss.name
        if reference is not None and "ref_logps" in batch:
            raise ValueError(
                "got both reference params and batch['ref_logps'] (cached reference log-probs); "
                "pass reference=None to use the cached ones, or drop the field"
            )
        if self.loss.requires_reference and reference is None and "ref_logps" not in batch:
            raise ValueError(
                f"loss '{name}' needs a reference: pass the frozen reference params, or batches "
                "with cached 'ref_logps' [B, 2] (see steps.reference_logps)"
            )
        if self.per_token and is_packed(batch):
            raise ValueError(
                f"loss '{name}' needs per-token log-probs [B, L], which packed batches do not "
                "provide; use the padded layout"
            )
        if self.ref_per_token and reference is None:
            raise ValueError(
                f"loss '{name}' needs per-token reference log-probs: pass the reference params "
                "(cached ref_logps sums are not enough)"
            )

    def reference_stats(self, scoring: Scoring, reference, batch: Batch, num_pairs: int):
        """Reference stats for `batch` (constant: no gradient flows into the reference)."""
        if not self.loss.requires_reference:
            return None
        if reference is None:
            return {"logps": batch["ref_logps"].astype(jnp.float32)}
        stats = scoring.pair_stats(
            lax.stop_gradient(reference), batch, num_pairs, per_token=self.ref_per_token
        )
        return lax.stop_gradient(stats)

    def preference_logps(self, policy, ref, batch: Batch) -> losses.PreferenceLogps:
        fields = {}
        for side, name in enumerate(("chosen", "rejected")):
            fields[f"{name}_logps"] = policy["logps"][:, side]
            fields[f"{name}_lengths"] = pair_lengths(batch)[:, side]
            if ref is not None:
                fields[f"ref_{name}_logps"] = ref["logps"][:, side]
            if self.per_token:
                fields[f"{name}_token_logps"] = policy["token_logps"][:, side]
                fields[f"{name}_loss_mask"] = batch["loss_mask"][:, side]
            if self.sum_sq:
                fields[f"{name}_log_sum_sq_probs"] = policy["log_sum_sq"][:, side]
            if self.ref_per_token:
                fields[f"ref_{name}_token_logps"] = ref["token_logps"][:, side]
        return losses.PreferenceLogps(**fields)

    def sums(self, policy, ref, batch: Batch) -> tuple[jax.Array, dict]:
        """(sum of the losses to average, metric sums over real pairs) for `batch`."""
        lp = self.preference_logps(policy, ref, batch)
        out = self.loss(lp, beta=self.beta, **dict(self.hparams))
        real = batch["pair_mask"] != 0
        if self.loss.per_pair:
            loss_sum = jnp.where(real, out.losses, 0.0).sum()
        else:  # entries are not pairs (e.g. sorted quantiles): all of them count
            loss_sum = out.losses.sum()
        chosen, rejected = out.chosen_rewards, out.rejected_rewards

        def total(x):
            return jnp.where(real, lax.stop_gradient(x).astype(jnp.float32), 0.0).sum()

        metrics = {  # keys: SUM_KEYS
            "rewards/chosen": total(chosen),
            "rewards/rejected": total(rejected),
            "rewards/accuracies": total(chosen > rejected),
            "rewards/margins": total(chosen - rejected),
            "logps/chosen": total(lp.chosen_logps),
            "logps/rejected": total(lp.rejected_logps),
            # The policy alone ranks the pair right (no reference): meaningful at step 0 too,
            # where every implicit reward is 0.
            "logps/accuracies": total(lp.chosen_logps > lp.rejected_logps),
            "tokens": total(lp.chosen_lengths + lp.rejected_lengths),
            "pairs": total(jnp.ones_like(chosen)),
        }
        return loss_sum, metrics


SUM_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logps/accuracies", "tokens", "pairs")  # fmt: skip


def _psum(x, axis):
    return x if axis is None else lax.psum(x, axis)


def _normalizer(objective: Objective, batch: Batch, axis) -> jax.Array:
    """What the loss sum is divided by: real pairs (or all loss entries) of the global batch."""
    if objective.loss.per_pair:
        count = (batch["pair_mask"] != 0).sum().astype(jnp.float32)
    else:
        count = jnp.float32(batch["pair_mask"].shape[0])
    return jnp.maximum(_psum(count, axis), 1.0)


def _means(loss, sums: dict, axis) -> dict:
    sums = _psum(sums, axis)
    pairs = jnp.maximum(sums["pairs"], 1.0)
    metrics = {k: v / pairs for k, v in sums.items() if k not in ("tokens", "pairs")}
    return {"loss": loss, **metrics, "tokens": sums["tokens"], "pairs": sums["pairs"]}


def preference_grads(params, reference, batch, key, *, scoring, objective, accum_steps, axis):
    """(grads, loss, metric sums) of the mean loss over the real pairs of the global batch.

    `grads` and `loss` are this device's share (to be psum'ed over `axis`); metric sums are
    this device's sums. `key` is the step's key; micro-batch i uses `fold_in(key, i)`.
    """
    objective.check(batch, reference)
    packed = is_packed(batch)
    norm = _normalizer(objective, batch, axis)
    num_pairs = batch["pair_mask"].shape[0]

    def policy_stats(p, mb, k, n):
        # Models without dropout ignore the key; it is there so that ones with dropout
        # never reuse a key.
        return scoring.pair_stats(p, mb, n, per_token=objective.per_token,
                                  sum_sq=objective.sum_sq, rngs={"dropout": k})  # fmt: skip

    def micro_objective(p, mb, ref, k):
        loss_sum, sums = objective.sums(policy_stats(p, mb, k, mb["pair_mask"].shape[0]), ref, mb)
        return loss_sum / norm, sums

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)
    if accum_steps == 1:
        ref = objective.reference_stats(scoring, reference, batch, num_pairs)
        (loss, sums), grads = grad_fn(params, batch, ref, jax.random.fold_in(key, 0))
        return grads, loss, sums

    micro, whole = split_micro_batches(batch, accum_steps, packed)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(accum_steps))
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    if not packed and objective.loss.per_pair:
        # One pass: micro-batches hold whole pairs and the loss is a sum over pairs.
        def accumulate(carry, xs):
            mb, k = xs
            ref = objective.reference_stats(scoring, reference, mb, mb["pair_mask"].shape[0])
            out = grad_fn(params, mb, ref, k)
            return jax.tree.map(jnp.add, carry, out), None

        zero_sums = {k: jnp.float32(0) for k in SUM_KEYS}
        init = ((jnp.float32(0), zero_sums), zero_grads)
        ((loss, sums), grads), _ = lax.scan(accumulate, init, (micro, keys))
        return grads, loss, sums

    # Two passes. Packed micro-batches give partial sums over all B pair slots (a pair's
    # sequences may lie in different micro-batches); padded ones give their slice of pairs.
    def micro_stats(p, mb, k):
        full = {**mb, **whole}
        return policy_stats(p, full, k, num_pairs if packed else mb["pair_mask"].shape[0])

    def forward(_, xs):
        mb, k = xs
        ref = None
        if reference is not None and objective.loss.requires_reference:
            full = {**mb, **whole}
            n = num_pairs if packed else mb["pair_mask"].shape[0]
            ref = objective.reference_stats(scoring, reference, full, n)
        return None, (micro_stats(params, mb, k), ref)

    _, (policy, ref) = lax.scan(forward, None, (micro, keys))
    merge = (lambda x: x.sum(0)) if packed else (lambda x: x.reshape(-1, *x.shape[2:]))
    policy, ref = jax.tree.map(merge, policy), jax.tree.map(merge, ref)
    if reference is None:
        ref = objective.reference_stats(scoring, None, batch, num_pairs)

    def whole_objective(stats):
        loss_sum, sums = objective.sums(stats, ref, batch)
        return loss_sum / norm, sums

    (loss, sums), cotangent = jax.value_and_grad(whole_objective, has_aux=True)(policy)
    if packed:
        split_ct = lambda c: jnp.broadcast_to(c, (accum_steps, *c.shape))
    else:
        split_ct = lambda c: c.reshape(accum_steps, -1, *c.shape[1:])

    def backward(grads, xs):
        mb, k, ct = xs
        _, vjp = jax.vjp(lambda p: micro_stats(p, mb, k), params)
        return jax.tree.map(jnp.add, grads, vjp(ct)[0]), None

    grads, _ = lax.scan(backward, zero_grads, (micro, keys, jax.tree.map(split_ct, cotangent)))
    return grads, loss, sums


# ------------------------------------------------------------------------------------------
# Update with a non-finite guard
# ------------------------------------------------------------------------------------------


def apply_gradients(state: TrainState, grads, loss, tx) -> tuple[TrainState, dict]:
    """Optimizer update unless `loss` or `grads` are non-finite; then params and optimizer
    state stay as they were. The step counter advances either way (the batch was used)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"grad_norm": grad_norm, "nonfinite_steps": (~finite).astype(jnp.float32)}
    lr = learning_rate_from_state(new_opt_state)
    if lr is not None:
        metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
    )
    return new_state, metrics


# ------------------------------------------------------------------------------------------
# Public steps
# ------------------------------------------------------------------------------------------


def _objective(loss_name, beta, loss_hparams) -> Objective:
    loss = losses.get(loss_name)
    hparams = dict(loss_hparams or {})
    if "beta" in hparams:
        raise ValueError("loss_hparams: pass beta as its own argument, not inside loss_hparams")
    unknown = sorted(set(hparams) - set(loss.hparams))
    if unknown:  # early, before any tracing
        raise ValueError(
            f"loss '{loss.name}': unknown hyperparameter(s) {unknown}; it accepts "
            f"{sorted(loss.hparams) or 'none'} besides beta"
        )
    return Objective(loss, float(beta), tuple(sorted(hparams.items())))


def _check_accum(accum_steps) -> int:
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    return accum_steps


def dpo_step(
    state: TrainState,
    batch: Batch,
    reference=None,
    *,
    model,
    tx: optax.GradientTransformation,
    loss_name: str | losses.Loss = "sigmoid",
    beta: float = 0.1,
    loss_hparams: Mapping[str, Any] | None = None,
    accum_steps: int = 1,
    grad_reduce_axis: str | None = None,
    memory_efficient: bool = False,
    chunk_size: int = 256,
    vocab_chunk_size: int | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step on a preference batch; pure. Prefer `make_dpo_step(...)`, which
    binds the keyword arguments (all static) and validates them once.

    state: `TrainState` of the policy.
    batch: padded (`tokens, positions, segment_ids, loss_mask: [B, 2, L]`) or packed
      (`... , slot_ids: [R, L]`) with `pair_mask: [B]` and optionally `ref_logps: [B, 2]`.
    reference: frozen reference params, or None (cached `ref_logps`, or a reference-free
      loss). Never differentiated, never modified.
    loss_name: a name from `losses.names()` or a `losses.Loss` (e.g. from `losses.build`).
    beta, loss_hparams: the loss's `beta` and its other hyperparameters.
    accum_steps: micro-batches per step (must divide B, or R for packed batches).
    grad_reduce_axis: the pmap axis name over which gradients and metrics are reduced.
    memory_efficient / chunk_size / vocab_chunk_size: see `Scoring`.
    Returns (new state, metrics: dict of float32 scalars, see the module docstring).
    """
    check_preference_batch(batch)
    scoring = Scoring(model, memory_efficient, chunk_size, vocab_chunk_size)
    objective = _objective(loss_name, beta, loss_hparams)
    grads, loss, sums = preference_grads(
        state.params, reference, batch, step_key(state), scoring=scoring,
        objective=objective, accum_steps=_check_accum(accum_steps), axis=grad_reduce_axis,
    )  # fmt: skip
    grads, loss = _psum((grads, loss), grad_reduce_axis)
    state, update_metrics = apply_gradients(state, grads, loss, tx)
    return state, {**_means(loss, sums, grad_reduce_axis), **update_metrics}


def make_dpo_step(**kwargs):
    """`step(state, batch, reference=None) -> (state, metrics)` with `dpo_step`'s keyword
    arguments bound (model, tx, loss_name, beta, ...). Loss name and hyperparameters are
    checked now, not at the first call."""
    _objective(kwargs.get("loss_name", "sigmoid"), kwargs.get("beta", 0.1),
               kwargs.get("loss_hparams"))  # fmt: skip
    _check_accum(kwargs.get("accum_steps", 1))
    return functools.partial(dpo_step, **kwargs)


def _loss_and_metrics(params, reference, batch: Batch, *, model, loss_name, beta, loss_hparams,
                      axis, memory_efficient, chunk_size, vocab_chunk_size):  # fmt: skip
    """(mean loss over the real pairs of the global batch, metrics); one forward, no update."""
    check_preference_batch(batch)
    scoring = Scoring(model, memory_efficient, chunk_size, vocab_chunk_size)
    objective = _objective(loss_name, beta, loss_hparams)
    objective.check(batch, reference)
    n = batch["pair_mask"].shape[0]
    ref = objective.reference_stats(scoring, reference, batch, n)
    policy = scoring.pair_stats(params, batch, n, per_token=objective.per_token,
                                sum_sq=objective.sum_sq)  # fmt: skip
    loss_sum, sums = objective.sums(policy, ref, batch)
    loss = _psum(loss_sum, axis) / _normalizer(objective, batch, axis)
    return loss, _means(loss, sums, axis)


def dpo_loss(
    params, reference, batch: Batch, *, model, loss_name="sigmoid", beta=0.1,
    loss_hparams=None, memory_efficient=False, chunk_size=256, vocab_chunk_size=None,
):  # fmt: skip
    """(mean loss over real pairs, metrics) as a differentiable function of `params` (and,
    formally, of `reference`, which receives exactly zero gradient). No accumulation."""
    return _loss_and_metrics(
        params, reference, batch, model=model, loss_name=loss_name, beta=beta,
        loss_hparams=loss_hparams, axis=None, memory_efficient=memory_efficient,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
    )  # fmt: skip


def eval_step(
    params, batch: Batch, reference=None, *, model, loss_name="sigmoid", beta=0.1,
    loss_hparams=None, reduce_axis=None, memory_efficient=False, chunk_size=256,
    vocab_chunk_size=None,
) -> dict:  # fmt: skip
    """Held-out metrics of `params` on a preference batch (no gradients): the DPO step's
    metrics without the update ones. Means are over the batch's real pairs (`pairs` gives
    the weight for averaging over batches); `reduce_axis` as `grad_reduce_axis`."""
    _, metrics = _loss_and_metrics(
        params, reference, batch, model=model, loss_name=loss_name, beta=beta,
        loss_hparams=loss_hparams, axis=reduce_axis, memory_efficient=memory_efficient,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
    )  # fmt: skip
    return metrics


def make_eval_step(**kwargs):
    """`eval(params, batch, reference=None) -> metrics` with `eval_step`'s keywords bound."""
    _objective(kwargs.get("loss_name", "sigmoid"), kwargs.get("beta", 0.1),
               kwargs.get("loss_hparams"))  # fmt: skip
    return functools.partial(eval_step, **kwargs)


# ------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------


def sft_step(
    state: TrainState,
    batch: Batch,
    reference=None,
    *,
    model,
    tx: optax.GradientTransformation,
    accum_steps: int = 1,
    grad_reduce_axis: str | None = None,
    memory_efficient: bool = False,
    chunk_size: int = 256,
    vocab_chunk_size: int | None = None,
) -> tuple[TrainState, dict]:
    """One SFT step: NLL of the completion tokens, mean over the scored tokens of the
    global batch (all micro-batches and devices); pure, same guard as `dpo_step`.

    batch: `tokens, positions, segment_ids, loss_mask: [B, L]` (padded or packed rows),
      optional `example_mask: [B]`. accum_steps must divide B.
    reference: must be None (the argument exists so `parallel.jit_step` wraps both steps).
    Metrics: `loss`, `tokens`, `grad_norm`, `nonfinite_steps`, `learning_rate`.
    """
    if reference is not None:
        raise ValueError("sft_step takes no reference model (pass reference=None)")
    check_sft_batch(batch)
    accum_steps = _check_accum(accum_steps)
    scoring = Scoring(model, memory_efficient, chunk_size, vocab_chunk_size)
    key = step_key(state)
    tokens = _psum((sft_mask(batch)).sum().astype(jnp.float32), grad_reduce_axis)

    def micro_loss(p, mb, k):
        rows = [mb[f] for f in ROW_FIELDS[:3]]
        token_logps, _ = scoring.token_logps(p, *rows, rngs={"dropout": k})
        nll = -jnp.where(sft_mask(mb), token_logps, 0.0).sum()
        return nll / jnp.maximum(tokens, 1.0)

    grad_fn = jax.value_and_grad(micro_loss)
    if accum_steps == 1:
        loss, grads = grad_fn(state.params, batch, jax.random.fold_in(key, 0))
    else:
        micro, _ = split_micro_batches(batch, accum_steps, packed=False)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(accum_steps))

        def accumulate(carry, xs):
            return jax.tree.map(jnp.add, carry, grad_fn(state.params, *xs)), None

        zero = (jnp.float32(0), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = lax.scan(accumulate, zero, (micro, keys))
    loss, grads = _psum((loss, grads), grad_reduce_axis)
    state, update_metrics = apply_gradients(state, grads, loss, tx)
    return state, {"loss": loss, "tokens": tokens, **update_metrics}


def make_sft_step(**kwargs):
    """`step(state, batch, reference=None) -> (state, metrics)` with `sft_step`'s keywords."""
    _check_accum(kwargs.get("accum_steps", 1))
    return functools.partial(sft_step, **kwargs)
