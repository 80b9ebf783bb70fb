"""Inputs, outputs and the `Loss` wrapper shared by every preference loss.

A loss only sees per-pair log-prob sums (and, for a few variants, per-token arrays); it knows
nothing about models or batches, so a notebook can call it on toy arrays:

    lp = PreferenceLogps(chosen_logps=jnp.array([-3.0]), rejected_logps=jnp.array([-5.0]),
                         ref_chosen_logps=jnp.array([-4.0]), ref_rejected_logps=jnp.array([-4.0]))
    out = losses.get("sigmoid")(lp, beta=0.1)   # LossOutput(losses [B], chosen_rewards, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class PreferenceLogps(NamedTuple):
    """Log-prob statistics of B preference pairs (a pytree; `None` fields are absent).

    Shapes: per-pair fields `[B]`, per-token fields `[B, L]` (padded layout, one row per
    response; `*_loss_mask` is 1 on scored response tokens).

    chosen_logps, rejected_logps: policy log-prob sums over the response tokens.
    ref_chosen_logps, ref_rejected_logps: the same under the reference model (None when
        reference-free).
    chosen_lengths, rejected_lengths: number of scored tokens (float32).
    chosen_token_logps, rejected_token_logps: policy per-token log-probs (WPO, LD-DPO).
    ref_chosen_token_logps, ref_rejected_token_logps: reference per-token log-probs (LD-DPO).
    chosen_loss_mask, rejected_loss_mask: scored-token masks of the per-token arrays.
    chosen_log_sum_sq_probs, rejected_log_sum_sq_probs: per-token `log sum_v p(v)^2` of the
        policy's next-token distribution (WPO's aligned weights).
    """

    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: jax.Array | None = None
    ref_rejected_logps: jax.Array | None = None
    chosen_lengths: jax.Array | None = None
    rejected_lengths: jax.Array | None = None
    chosen_token_logps: jax.Array | None = None
    rejected_token_logps: jax.Array | None = None
    ref_chosen_token_logps: jax.Array | None = None
    ref_rejected_token_logps: jax.Array | None = None
    chosen_loss_mask: jax.Array | None = None
    rejected_loss_mask: jax.Array | None = None
    chosen_log_sum_sq_probs: jax.Array | None = None
    rejected_log_sum_sq_probs: jax.Array | None = None


class LossOutput(NamedTuple):
    """Per-pair losses `[B]` and implicit rewards `[B]` (gradient-free).

    terms: named per-pair parts of the loss `[B]` (gradient-free) that training reports as
      `terms/<name>` metrics; None, or exactly the names the loss declares in `Loss.terms`.
    """

    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    terms: Mapping[str, jax.Array] | None = None


REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
LENGTH_FIELDS = ("chosen_lengths", "rejected_lengths")
PER_PAIR_FIELDS = ("chosen_logps", "rejected_logps", *REFERENCE_FIELDS, *LENGTH_FIELDS)
# Per-token fields a loss may need ([B, L]): the policy's, the reference's, and WPO's
# log sum_v p(v)^2 of the policy's next-token distribution.
TOKEN_FIELDS = ("chosen_token_logps", "rejected_token_logps", "chosen_loss_mask",
                "rejected_loss_mask")  # fmt: skip
REF_TOKEN_FIELDS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
SUM_SQ_FIELDS = ("chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs")


def as_float32(lp: PreferenceLogps) -> PreferenceLogps:
    """Casts every present field to float32: loss math never runs in bf16/fp16."""
    return PreferenceLogps(*(None if x is None else jnp.asarray(x, jnp.float32) for x in lp))


def log_ratios(lp: PreferenceLogps) -> tuple[jax.Array, jax.Array]:
    """`log pi(y|x) - log pi_ref(y|x)` for chosen and rejected, `[B]` each."""
    return lp.chosen_logps - lp.ref_chosen_logps, lp.rejected_logps - lp.ref_rejected_logps


def ratio_rewards(lp: PreferenceLogps, beta) -> tuple[jax.Array, jax.Array]:
    """DPO's implicit rewards `beta * (logp - ref_logp)`, without gradient."""
    chosen, rejected = log_ratios(lp)
    return jax.lax.stop_gradient(beta * chosen), jax.lax.stop_gradient(beta * rejected)


def safe_lengths(lengths: jax.Array) -> jax.Array:
    """Token counts clamped at 1, as TRL does, so empty responses never divide by zero."""
    return jnp.maximum(lengths, 1.0)


# core(lp, scores, *, beta, **hparams) -> LossOutput. `lp` is validated and float32; `scores` is
# None (use the log-ratios) or a (chosen, rejected) pair of f-divergence scores.
CoreFn = Callable[..., LossOutput]


class Loss:
    """A named preference loss, called as `fn(logps, *, beta, **hparams) -> LossOutput`.

    Attributes: `name`, `requires_reference`, `hparams` (accepted names -> defaults), `needs`
    (PreferenceLogps fields that must be present), `score_based` (its margin is built only from
    chosen/rejected log-ratio scores, so an f-divergence may replace them), `per_pair` (entry i
    of its losses belongs to pair i; False for losses that sort the batch), `terms` (names of
    the per-pair loss parts its output reports in `LossOutput.terms`), `core`.
    """

    def __init__(
        self,
        name: str,
        core: CoreFn,
        *,
        requires_reference: bool,
        hparams: Mapping[str, Any],
        needs: tuple[str, ...] = (),
        score_based: bool = False,
        per_pair: bool = True,
        terms: tuple[str, ...] = (),
        doc: str | None = None,
    ):
        self.name = name
        self.core = core
        self.requires_reference = requires_reference
        self.hparams = dict(hparams)
        self.needs = tuple(
            dict.fromkeys((*REFERENCE_FIELDS, *needs) if requires_reference else needs)
        )
        self.score_based = score_based
        self.per_pair = per_pair
        self.terms = tuple(terms)
        self.__doc__ = doc

    def __repr__(self) -> str:
        return f"Loss({self.name!r}, requires_reference={self.requires_reference})"

    def check_hparams(self, hparams: Mapping[str, Any], beta=None) -> None:
        """Unknown hyperparameters and a non-positive beta (a Python number; traced betas are
        not checked). Called by every loss call, and early by training configs."""
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise ValueError(
                f"loss '{self.name}': unknown hyperparameter(s) {unknown}; it accepts "
                f"{sorted(self.hparams) or 'none'} besides beta"
            )
        if isinstance(beta, int | float) and not beta > 0:
            raise ValueError(f"loss '{self.name}': beta must be > 0, got {beta}")

    def _check_arguments(self, logps, hparams: Mapping[str, Any], beta) -> None:
        """Hyperparameters, beta, and missing required fields."""
        self.check_hparams(hparams, beta)
        for field in self.needs:
            if getattr(logps, field) is None:
                why = " (it needs a reference model)" if field in REFERENCE_FIELDS else ""
                raise ValueError(
                    f"loss '{self.name}' needs {type(logps).__name__}.{field}, got None{why}"
                )

    def validate(self, logps: PreferenceLogps, hparams: Mapping[str, Any], beta) -> PreferenceLogps:
        """Checks inputs and hyperparameters; returns the float32 logps."""
        if not isinstance(logps, PreferenceLogps):
            raise TypeError(
                f"loss '{self.name}': expected a PreferenceLogps, got {type(logps).__name__}"
            )
        self._check_arguments(logps, hparams, beta)
        shape = jnp.shape(logps.chosen_logps)
        if len(shape) != 1:
            raise ValueError(f"loss '{self.name}': chosen_logps must have shape [B], got {shape}")
        for field in PER_PAIR_FIELDS:
            value = getattr(logps, field)
            if value is not None and jnp.shape(value) != shape:
                raise ValueError(
                    f"loss '{self.name}': PreferenceLogps.{field} has shape {jnp.shape(value)}, "
                    f"expected {shape} like chosen_logps"
                )
        return as_float32(logps)

    def __call__(self, logps: PreferenceLogps, *, beta, **hparams) -> LossOutput:
        lp = self.validate(logps, hparams, beta)
        # Each core fills in its own defaults, so combined losses keep per-loss defaults.
        return self.core(lp, None, beta=beta, **hparams)


def pairwise(name: str, *, score_based: bool = False, needs: tuple[str, ...] = (), **defaults):
    """Decorator building a `Loss` for a reference-based loss written on log-ratio scores.

    The decorated `f(lp, chosen_scores, rejected_scores, *, beta, **hparams) -> losses [B]`
    gets `chosen_scores = logp - ref_logp` unless an f-divergence supplies other scores;
    rewards are always `beta * (logp - ref_logp)` (as in TRL).
    """

    def wrap(f: Callable[..., jax.Array]) -> Loss:
        def core(lp, scores, *, beta, **hparams):
            chosen_scores, rejected_scores = log_ratios(lp) if scores is None else scores
            losses = f(lp, chosen_scores, rejected_scores, beta=beta, **{**defaults, **hparams})
            return LossOutput(losses, *ratio_rewards(lp, beta))

        return Loss(
            name,
            core,
            requires_reference=True,
            hparams=defaults,
            needs=needs,
            score_based=score_based,
            doc=f.__doc__,
        )

    return wrap


def reference_free(
    name: str, *, needs: tuple[str, ...] = (), terms: tuple[str, ...] = (), **defaults
):
    """Decorator for a loss of policy log-probs only: `f(lp, *, beta, **hp) -> LossOutput`."""

    def wrap(f: Callable[..., LossOutput]) -> Loss:
        def core(lp, scores, *, beta, **hparams):
            del scores  # reference-free losses have no log-ratio to transform
            return f(lp, beta=beta, **{**defaults, **hparams})

        return Loss(
            name,
            core,
            requires_reference=False,
            hparams=defaults,
            needs=needs,
            terms=terms,
            doc=f.__doc__,
        )

    return wrap
