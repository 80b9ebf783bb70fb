"""Everything inside one jitted train step: the objective, accumulation, the guarded update.

`make_dpo_step(...)` / `make_sft_step(...)` bind the static parts (model, optimizer,
`Objective`, `ScoringOptions`, accumulation, `Guard`) and return
`step(state, batch, reference) -> (state, metrics)`; `make_eval_step(...)` returns
`evaluate(params, batch, reference) -> metrics`. The caller jits them with shardings and a
donated state (`dpo_jax.parallel.jit_step`) or pmaps them (`parallel.pmap_step`, with
`axis_name=parallel.PMAP_AXIS`). Batches: see `dpo_jax.data.batching`.

One DPO step, for a batch of B pairs:
  1. policy: ONE forward over all sequences (`scoring.Scoring.pair_stats`).
  2. reference: frozen params (forward under `stop_gradient`, never differentiated), or
     cached sums `batch["ref_logps"]: [B, 2]`, or none for reference-free losses.
  3. loss: `Objective` = a registered loss with its beta and hyperparameters, averaged over
     the real pairs (`pair_mask`) of the whole batch, over all micro-batches and devices.
  4. update: gradients psum'ed over `axis_name`, optimizer (clipping inside it), and a
     guard that keeps params and optimizer state when the loss, the gradients or the new
     params are not finite, or when the update is implausibly large (`Guard`).

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
whose chosen log-prob exceeds the rejected one under the policy alone), `terms/<name>` (the
means of the per-pair loss parts a loss reports, e.g. unlikelihood's), `grad_norm`
(before clipping), `update_norm`, `tokens` (scored tokens of real pairs), `pairs`,
`learning_rate` (the rate this update applied; with `make_optimizer`), `nonfinite_steps`
(1 when the loss, gradients or new params were not finite) and `rejected_steps` (1 when a
finite update was refused by the guard's bound).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dpo_jax import losses
from dpo_jax.data.batching import (
    PACKED_ROW_FIELDS,
    ROW_FIELDS,
    check_preference_batch,
    check_sft_batch,
    is_packed,
)
from dpo_jax.losses.core import REF_TOKEN_FIELDS, SUM_SQ_FIELDS, TOKEN_FIELDS
from dpo_jax.models import lora as lora_lib
from dpo_jax.models.lora import LoraConfig
from dpo_jax.train.optimizers import learning_rate_from_state
from dpo_jax.train.scoring import DEFAULT_SCORING, Scoring, ScoringOptions, pair_lengths
from dpo_jax.train.state import TrainState, step_key

Batch = Mapping[str, jax.Array]
SUM_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracies",
    "tokens",
    "pairs",
)


# ------------------------------------------------------------------------------------------
# The preference objective
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
    """A preference loss with its beta and hyperparameters, and what it needs (static).

    Build it with `Objective.create`, which checks the name and hyperparameters once.
    """

    loss: losses.Loss
    beta: float
    hparams: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def create(
        cls,
        loss: str | losses.Loss = "sigmoid",
        beta: float = 0.1,
        hparams: Mapping[str, Any] | None = None,
    ) -> Objective:
        """The one place for the loss defaults: sigmoid (DPO), beta 0.1 (the paper's)."""
        loss = losses.get(loss)
        hparams = dict(hparams or {})
        if "beta" in hparams:
            raise ValueError("loss hparams: pass beta as its own argument, not inside hparams")
        loss.check_hparams(hparams, float(beta))
        return cls(loss, float(beta), tuple(sorted(hparams.items())))

    @property
    def sum_keys(self) -> tuple[str, ...]:
        """Keys of `sums`' metric sums: SUM_KEYS and the loss's reported `terms/<name>`."""
        return (*SUM_KEYS, *(f"terms/{name}" for name in self.loss.terms))

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
                "with cached 'ref_logps' [B, 2] (see scoring.pair_logps)"
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

    def policy_stats(self, scoring: Scoring, params, batch: Batch, num_pairs: int, key=None):
        # Models without dropout ignore the key; it is there so that ones with dropout
        # never reuse a key.
        rngs = None if key is None else {"dropout": key}
        return scoring.pair_stats(
            params, batch, num_pairs, per_token=self.per_token, sum_sq=self.sum_sq, rngs=rngs
        )

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
        for name in self.loss.terms:
            metrics[f"terms/{name}"] = total(out.terms[name])
        return loss_sum, metrics

    def normalizer(self, batch: Batch, axis_name) -> jax.Array:
        """What the loss sum is divided by: real pairs (or all loss entries) of the global
        batch."""
        if self.loss.per_pair:
            count = (batch["pair_mask"] != 0).sum().astype(jnp.float32)
        else:
            count = jnp.float32(batch["pair_mask"].shape[0])
        return jnp.maximum(_psum(count, axis_name), 1.0)


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def _means(loss, sums: dict, axis_name) -> dict:
    sums = _psum(sums, axis_name)
    pairs = jnp.maximum(sums["pairs"], 1.0)
    metrics = {k: v / pairs for k, v in sums.items() if k not in ("tokens", "pairs")}
    return {"loss": loss, **metrics, "tokens": sums["tokens"], "pairs": sums["pairs"]}


# ------------------------------------------------------------------------------------------
# Gradients of the preference objective, with exact accumulation
# ------------------------------------------------------------------------------------------


def split_micro_batches(batch: Batch, accum_steps: int, packed: bool) -> tuple[dict, dict]:
    """Splits the micro-batched fields into [A, ...] (returned first) from the global ones.

    Padded: every field is split along B. Packed: row fields along R; `pair_mask` and
    `ref_logps` ([B] pair slots, shared by all rows) stay whole.
    """
    split_fields = (*ROW_FIELDS, *PACKED_ROW_FIELDS) if packed else tuple(batch)
    lead_name = "R (rows)" if packed else "B (pairs)"
    micro, whole = {}, {}
    for name, x in batch.items():
        if name not in split_fields:
            whole[name] = x
            continue
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"accum_steps={accum_steps} must divide the batch's {lead_name} = {x.shape[0]} "
                f"(field {name!r})"
            )
        micro[name] = x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    return micro, whole


def _micro_keys(key, accum_steps: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(accum_steps))


@dataclasses.dataclass(frozen=True)
class _Grads:
    """The static parts of one gradient computation (see `preference_grads`)."""

    scoring: Scoring
    objective: Objective
    norm: jax.Array  # the loss normalizer of the global batch (a traced scalar)
    to_policy: Callable = lambda params: params  # trained params -> the model's params

    def micro_loss(self, params, mb, ref, key):
        """(this micro-batch's share of the mean loss, its metric sums)."""
        n = mb["pair_mask"].shape[0]
        policy = self.objective.policy_stats(self.scoring, self.to_policy(params), mb, n, key)
        loss_sum, sums = self.objective.sums(policy, ref, mb)
        return loss_sum / self.norm, sums


def preference_grads(
    params, reference, batch, key, *, scoring, objective, accum_steps, axis_name, to_policy=None
):
    """(grads, loss, metric sums) of the mean loss over the real pairs of the global batch.

    `grads` and `loss` are this device's share (to be psum'ed over `axis_name`); metric sums
    are this device's sums. `key` is the step's key; micro-batch i uses `fold_in(key, i)`.
    to_policy: maps the trained `params` to the model's params (LoRA: `lora.merge` of the
    frozen base with the adapters); default: they are the model's params.
    """
    objective.check(batch, reference)
    g = _Grads(scoring, objective, objective.normalizer(batch, axis_name))
    if to_policy is not None:
        g = dataclasses.replace(g, to_policy=to_policy)
    if accum_steps == 1:
        n = batch["pair_mask"].shape[0]
        ref = objective.reference_stats(scoring, reference, batch, n)
        value_and_grad = jax.value_and_grad(g.micro_loss, has_aux=True)
        (loss, sums), grads = value_and_grad(params, batch, ref, jax.random.fold_in(key, 0))
        return grads, loss, sums
    if not is_packed(batch) and objective.loss.per_pair:
        return _one_pass_grads(g, params, reference, batch, key, accum_steps)
    return _two_pass_grads(g, params, reference, batch, key, accum_steps)


def _one_pass_grads(g: _Grads, params, reference, batch, key, accum_steps):
    """Micro-batches hold whole pairs and the loss is a sum over pairs: add their grads."""
    micro, _ = split_micro_batches(batch, accum_steps, packed=False)
    value_and_grad = jax.value_and_grad(g.micro_loss, has_aux=True)

    def accumulate(carry, xs):
        mb, k = xs
        ref = g.objective.reference_stats(g.scoring, reference, mb, mb["pair_mask"].shape[0])
        return jax.tree.map(jnp.add, carry, value_and_grad(params, mb, ref, k)), None

    zero_sums = {k: jnp.float32(0) for k in g.objective.sum_keys}
    init = ((jnp.float32(0), zero_sums), jax.tree.map(jnp.zeros_like, params))
    ((loss, sums), grads), _ = lax.scan(accumulate, init, (micro, _micro_keys(key, accum_steps)))
    return grads, loss, sums


def _two_pass_grads(g: _Grads, params, reference, batch, key, accum_steps):
    """Forward every micro-batch, take the whole batch's loss and its cotangents w.r.t. the
    pair stats, then backpropagate each micro-batch's share. Packed micro-batches give
    partial sums over all B pair slots (a pair's sequences may lie in different
    micro-batches); padded ones give their slice of pairs."""
    packed = is_packed(batch)
    objective, scoring = g.objective, g.scoring
    micro, whole = split_micro_batches(batch, accum_steps, packed)
    keys = _micro_keys(key, accum_steps)
    num_pairs = batch["pair_mask"].shape[0]

    def full(mb):  # a micro-batch with the batch-wide fields, and its number of pair slots
        return {**mb, **whole}, (num_pairs if packed else mb["pair_mask"].shape[0])

    def micro_stats(p, mb, k):
        return objective.policy_stats(scoring, g.to_policy(p), *full(mb), k)

    def forward(_, xs):
        mb, k = xs
        ref = None
        if reference is not None and objective.loss.requires_reference:
            ref = objective.reference_stats(scoring, reference, *full(mb))
        return None, (micro_stats(params, mb, k), ref)

    _, (policy, ref) = lax.scan(forward, None, (micro, keys))
    merge = (lambda x: x.sum(0)) if packed else (lambda x: x.reshape(-1, *x.shape[2:]))
    policy, ref = jax.tree.map(merge, policy), jax.tree.map(merge, ref)
    if reference is None:
        ref = objective.reference_stats(scoring, None, batch, num_pairs)

    def whole_loss(stats):
        loss_sum, sums = objective.sums(stats, ref, batch)
        return loss_sum / g.norm, sums

    (loss, sums), cotangent = jax.value_and_grad(whole_loss, has_aux=True)(policy)
    if packed:
        split_ct = lambda c: jnp.broadcast_to(c, (accum_steps, *c.shape))
    else:
        split_ct = lambda c: c.reshape(accum_steps, -1, *c.shape[1:])

    def backward(grads, xs):
        mb, k, ct = xs
        _, vjp = jax.vjp(lambda p: micro_stats(p, mb, k), params)
        return jax.tree.map(jnp.add, grads, vjp(ct)[0]), None

    xs = (micro, keys, jax.tree.map(split_ct, cotangent))
    grads, _ = lax.scan(backward, jax.tree.map(jnp.zeros_like, params), xs)
    return grads, loss, sums


# ------------------------------------------------------------------------------------------
# The guarded update
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Guard:
    """Which updates a step refuses (params and optimizer state then stay as they were).

    Always refused: a non-finite loss, non-finite gradients, or non-finite new params.
    max_update_ratio: also refuse a finite update whose global norm exceeds this multiple
      of the params' global norm (0 = no bound). A healthy step moves params by a tiny
      fraction of their norm; an update as large as the params themselves is a blow-up
      (e.g. a learning rate off by orders of magnitude), not learning.
    """

    max_update_ratio: float = 1.0

    def __post_init__(self):
        if not self.max_update_ratio >= 0:
            raise ValueError(f"max_update_ratio must be >= 0, got {self.max_update_ratio!r}")


DEFAULT_GUARD = Guard()


def apply_gradients(state: TrainState, grads, loss, tx, guard: Guard = DEFAULT_GUARD):
    """(new state, update metrics): the optimizer update unless the guard refuses it. The
    step counter advances either way (the batch was used)."""
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    update_norm = optax.global_norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    # Finite updates can still overflow the params (1e38 + 1e38 = inf in float32).
    finite &= jnp.isfinite(optax.global_norm(new_params))
    rejected = jnp.zeros((), bool)
    if guard.max_update_ratio:
        bound = guard.max_update_ratio * optax.global_norm(state.params)
        rejected = finite & (update_norm > bound)
    accept = finite & ~rejected
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)
    metrics = {
        "grad_norm": grad_norm,
        "update_norm": update_norm,
        "nonfinite_steps": (~finite).astype(jnp.float32),
        "rejected_steps": rejected.astype(jnp.float32),
    }
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
# The steps
# ------------------------------------------------------------------------------------------


def _check_accum(accum_steps) -> int:
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    return accum_steps


def _dpo_step(
    state: TrainState,
    batch: Batch,
    reference=None,
    *,
    model,
    tx,
    objective,
    scoring,
    accum_steps,
    axis_name,
    guard,
    lora,
) -> tuple[TrainState, dict]:
    check_preference_batch(batch)
    grads, loss, sums = preference_grads(
        state.params,
        reference,
        batch,
        step_key(state),
        scoring=Scoring(model, scoring),
        objective=objective,
        accum_steps=accum_steps,
        axis_name=axis_name,
        to_policy=lora_policy(lora, reference, model),
    )
    grads, loss = _psum((grads, loss), axis_name)
    state, update_metrics = apply_gradients(state, grads, loss, tx, guard)
    return state, {**_means(loss, sums, axis_name), **update_metrics}


def make_dpo_step(
    *,
    model,
    tx: optax.GradientTransformation,
    objective: Objective | None = None,
    scoring: ScoringOptions = DEFAULT_SCORING,
    accum_steps: int = 1,
    axis_name: str | None = None,
    guard: Guard = DEFAULT_GUARD,
    lora: LoraConfig | None = None,
):
    """`step(state, batch, reference=None) -> (state, metrics)`: one optimizer step on a
    preference batch; pure.

    state: `TrainState` of the policy. batch: padded or packed (`dpo_jax.data.batching`),
      optionally with cached `ref_logps: [B, 2]`.
    reference: frozen reference params, or None (cached `ref_logps`, or a reference-free
      loss). Never differentiated, never modified.
    objective: the loss, beta and hyperparameters (default `Objective.create()`: DPO).
    accum_steps: micro-batches per step (must divide B, or R for packed batches).
    axis_name: the pmap axis over which gradients and metrics are reduced.
    lora: LoRA DPO (`dpo_jax.models.lora`): `state.params` are the adapters (the only
      params the optimizer sees), `reference` the frozen base they are merged into; the
      base with the adapters off is the reference.
    Metrics: float32 scalars, see the module docstring.
    """
    return functools.partial(
        _dpo_step,
        model=model,
        tx=tx,
        objective=objective or Objective.create(),
        scoring=scoring,
        accum_steps=_check_accum(accum_steps),
        axis_name=axis_name,
        guard=guard,
        lora=lora,
    )


def lora_policy(lora: LoraConfig | None, base, model) -> Callable | None:
    """LoRA: adapters -> the policy's params, merged into the frozen base (`reference`) in
    the model's compute dtype (what its kernels are cast to at use)."""
    if lora is None:
        return None
    if base is None:
        raise ValueError("LoRA DPO needs the frozen base params as the reference argument")
    dtype = jnp.dtype(getattr(getattr(model, "config", None), "dtype", "float32"))
    return functools.partial(lora_lib.merge, base, config=lora, dtype=dtype)


def preference_loss(
    params,
    reference,
    batch: Batch,
    *,
    model,
    objective: Objective,
    scoring: ScoringOptions = DEFAULT_SCORING,
    axis_name=None,
    lora: LoraConfig | None = None,
):
    """(mean loss over the real pairs of the global batch, metrics): one forward, no update.

    Differentiable in `params`; `reference` receives exactly zero gradient. Metric means are
    over the batch's real pairs (`pairs` gives the weight for averaging over batches).
    lora: `params` are adapters merged into the base `reference` (see `make_dpo_step`).
    """
    check_preference_batch(batch)
    objective.check(batch, reference)
    if lora is not None:
        params = lora_policy(lora, reference, model)(params)
    scorer, n = Scoring(model, scoring), batch["pair_mask"].shape[0]
    ref = objective.reference_stats(scorer, reference, batch, n)
    loss_sum, sums = objective.sums(objective.policy_stats(scorer, params, batch, n), ref, batch)
    loss = _psum(loss_sum, axis_name) / objective.normalizer(batch, axis_name)
    return loss, _means(loss, sums, axis_name)


def make_eval_step(
    *,
    model,
    objective: Objective | None = None,
    scoring: ScoringOptions = DEFAULT_SCORING,
    axis_name=None,
    lora: LoraConfig | None = None,
):
    """`evaluate(params, batch, reference=None) -> metrics`: the DPO step's metrics on a
    held-out batch, without gradients or update metrics."""
    objective = objective or Objective.create()

    def evaluate(params, batch, reference=None):
        return preference_loss(
            params,
            reference,
            batch,
            model=model,
            objective=objective,
            scoring=scoring,
            axis_name=axis_name,
            lora=lora,
        )[1]

    return evaluate


# ------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------


def sft_mask(batch: Batch) -> jax.Array:
    """Scored tokens of an SFT batch: the loss mask of its real examples. [B, L] bool."""
    mask = batch["loss_mask"] != 0
    if "example_mask" in batch:
        mask = mask & (batch["example_mask"][:, None] != 0)
    return mask


def _sft_step(
    state: TrainState,
    batch: Batch,
    reference=None,
    *,
    model,
    tx,
    scoring,
    accum_steps,
    axis_name,
    guard,
) -> tuple[TrainState, dict]:
    if reference is not None:
        raise ValueError("the SFT step takes no reference model (pass reference=None)")
    check_sft_batch(batch)
    scorer, key = Scoring(model, scoring), step_key(state)
    tokens = _psum(sft_mask(batch).sum().astype(jnp.float32), axis_name)

    def micro_loss(p, mb, k):
        rows = [mb[f] for f in ROW_FIELDS[:3]]
        mask = sft_mask(mb)
        token_logps, _ = scorer.token_logps(p, *rows, rngs={"dropout": k}, loss_mask=mask)
        nll = -jnp.where(mask, token_logps, 0.0).sum()
        return nll / jnp.maximum(tokens, 1.0)

    value_and_grad = jax.value_and_grad(micro_loss)
    if accum_steps == 1:
        loss, grads = value_and_grad(state.params, batch, jax.random.fold_in(key, 0))
    else:
        micro, _ = split_micro_batches(batch, accum_steps, packed=False)

        def accumulate(carry, xs):
            return jax.tree.map(jnp.add, carry, value_and_grad(state.params, *xs)), None

        zero = (jnp.float32(0), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = lax.scan(accumulate, zero, (micro, _micro_keys(key, accum_steps)))
    loss, grads = _psum((loss, grads), axis_name)
    state, update_metrics = apply_gradients(state, grads, loss, tx, guard)
    return state, {"loss": loss, "tokens": tokens, **update_metrics}


def make_sft_step(
    *,
    model,
    tx: optax.GradientTransformation,
    scoring: ScoringOptions = DEFAULT_SCORING,
    accum_steps: int = 1,
    axis_name: str | None = None,
    guard: Guard = DEFAULT_GUARD,
):
    """`step(state, batch, reference=None) -> (state, metrics)`: one SFT step, the NLL of
    the completion tokens averaged over the scored tokens of the global batch (all
    micro-batches and devices); pure, same guard as the DPO step.

    batch: an SFT batch (`dpo_jax.data.batching`); accum_steps must divide B.
    reference: must be None (the argument exists so `parallel.jit_step` wraps both steps).
    Metrics: `loss`, `tokens`, `grad_norm`, `update_norm`, `nonfinite_steps`,
    `rejected_steps`, `learning_rate`.
    """
    return functools.partial(
        _sft_step,
        model=model,
        tx=tx,
        scoring=scoring,
        accum_steps=_check_accum(accum_steps),
        axis_name=axis_name,
        guard=guard,
    )
