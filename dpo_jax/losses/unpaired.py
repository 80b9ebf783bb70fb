"""Unpaired (desirable / undesirable) losses: KTO and APO-zero-unpaired (TRL `KTOTrainer`).

Each example is one response with a binary label; the function is pure: the KL baseline of KTO
is an explicit input (see `kto_kl_estimate`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax.losses.core import Loss


class UnpairedLogps(NamedTuple):
    """Log-prob sums of B unpaired examples (a pytree).

    logps, ref_logps: `[B]` policy / reference log-prob sums over the response tokens.
    labels: `[B]` bool or int, 1 = desirable, 0 = undesirable.
    kl: scalar estimate of KL(pi || pi_ref) on mismatched prompt/response pairs (KTO's z_0);
        None for losses that do not use it.
    """

    logps: jax.Array
    ref_logps: jax.Array
    labels: jax.Array
    kl: jax.Array | float | None = None


class UnpairedLossOutput(NamedTuple):
    """Per-example losses `[B]` (already weighted) and rewards `beta * (logp - ref_logp)` `[B]`."""

    losses: jax.Array
    rewards: jax.Array


class UnpairedLoss(Loss):
    """A named unpaired loss: `fn(logps: UnpairedLogps, *, beta, **hparams)`."""

    def __init__(self, name, core, *, hparams, needs=(), doc=None):
        super().__init__(name, core, requires_reference=False, hparams=hparams, doc=doc)
        # Every unpaired loss here compares to the reference; its fields are UnpairedLogps's.
        self.requires_reference = True
        self.needs = ("ref_logps", *needs)

    def validate(self, logps, hparams, beta):
        if not isinstance(logps, UnpairedLogps):
            raise TypeError(
                f"loss '{self.name}': expected UnpairedLogps, got {type(logps).__name__}"
            )
        self._check_arguments(logps, hparams, beta)
        shape = jnp.shape(logps.logps)
        for field in ("ref_logps", "labels"):
            if jnp.shape(getattr(logps, field)) != shape or len(shape) != 1:
                raise ValueError(
                    f"loss '{self.name}': UnpairedLogps.{field} has shape "
                    f"{jnp.shape(getattr(logps, field))}, expected [B] = {shape}"
                )
        kl = None if logps.kl is None else jnp.asarray(logps.kl, jnp.float32)
        if kl is not None and kl.shape != ():
            raise ValueError(
                f"loss '{self.name}': UnpairedLogps.kl must be a scalar, got {kl.shape}"
            )
        return UnpairedLogps(
            jnp.asarray(logps.logps, jnp.float32),
            jnp.asarray(logps.ref_logps, jnp.float32),
            jnp.asarray(logps.labels).astype(bool),
            kl,
        )


def unpaired(name: str, *, needs: tuple[str, ...] = (), **defaults: Any):
    def wrap(f):
        def core(lp, scores, *, beta, **hparams):
            del scores
            return f(lp, beta=beta, **{**defaults, **hparams})

        return UnpairedLoss(name, core, hparams=defaults, needs=needs, doc=f.__doc__)

    return wrap


def kto_kl_estimate(kl_logps: jax.Array, ref_kl_logps: jax.Array, mask=None) -> jax.Array:
    """KTO's z_0: `max(0, mean(logp - ref_logp))` over mismatched (x, y') pairs, no gradient.

    `kl_logps, ref_kl_logps: [B]` policy/reference log-prob sums of responses paired with other
    examples' prompts; `mask: [B]` selects real examples. Average across data-parallel devices
    before the clamp to match TRL (which gathers, then clamps).
    """
    diff = kl_logps.astype(jnp.float32) - ref_kl_logps.astype(jnp.float32)
    mask = jnp.ones_like(diff) if mask is None else mask.astype(jnp.float32)
    mean = jnp.sum(diff * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


@unpaired("kto", needs=("kl",), desirable_weight=1.0, undesirable_weight=1.0)
def kto(lp, *, beta, desirable_weight, undesirable_weight):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7), as TRL's `KTOTrainer`.

    With `rho = logp - ref_logp` and `z_0 = max(kl, 0)` (no gradient):
    desirable: `desirable_weight * (1 - sigma(beta (rho - z_0)))`,
    undesirable: `undesirable_weight * (1 - sigma(beta (z_0 - rho)))`.
    `beta` is the risk-aversion / reward scale of the value function. TRL's batch loss is the
    mean of these per-example losses.
    """
    rho = lp.logps - lp.ref_logps
    z0 = jax.lax.stop_gradient(jnp.maximum(lp.kl, 0.0))
    desirable = desirable_weight * jax.nn.sigmoid(-beta * (rho - z0))
    undesirable = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - rho))
    losses = jnp.where(lp.labels, desirable, undesirable)
    return UnpairedLossOutput(losses, jax.lax.stop_gradient(beta * rho))


@unpaired("apo_zero_unpaired", desirable_weight=1.0, undesirable_weight=1.0)
def apo_zero_unpaired(lp, *, beta, desirable_weight, undesirable_weight):
    """APO-zero, unpaired (D'Oosterlinck et al. 2024, arXiv 2408.06266), as TRL's `KTOTrainer`.

    desirable: `desirable_weight * (1 - sigma(beta rho))`, undesirable:
    `undesirable_weight * sigma(beta rho)`, `rho = logp - ref_logp`. `beta` is the reward scale.
    """
    rho = lp.logps - lp.ref_logps
    losses = jnp.where(
        lp.labels,
        desirable_weight * jax.nn.sigmoid(-beta * rho),
        undesirable_weight * jax.nn.sigmoid(beta * rho),
    )
    return UnpairedLossOutput(losses, jax.lax.stop_gradient(beta * rho))


LOSSES = (kto, apo_zero_unpaired)
