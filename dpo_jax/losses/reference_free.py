"""Preference losses of the policy alone (no reference model): reference-free DPO, SimPO, CPO,
ORPO and the SFT (chosen NLL) term.

Notation: `logp_w`, `logp_l` are the policy's chosen/rejected log-prob sums `[B]`, `|y|` the
scored-token count, `a_w = logp_w / |y_w|` the average per-token log-prob.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpo_jax.losses.core import (
    LENGTH_FIELDS,
    LossOutput,
    ratio_rewards,
    reference_free,
    safe_lengths,
)
from dpo_jax.losses.pairwise import check_range, require, smoothed_sigmoid_loss

stop_gradient = jax.lax.stop_gradient


def policy_rewards(chosen, rejected, beta) -> tuple[jax.Array, jax.Array]:
    return stop_gradient(beta * chosen), stop_gradient(beta * rejected)


def average_logps(lp) -> tuple[jax.Array, jax.Array]:
    """Per-token average log-probs `a_w, a_l`, `[B]` each."""
    return lp.chosen_logps / safe_lengths(lp.chosen_lengths), lp.rejected_logps / safe_lengths(
        lp.rejected_lengths
    )


def chosen_nll(lp) -> jax.Array:
    """`-logp_w / |y_w|`: the chosen response's NLL per token, `[B]`."""
    return -lp.chosen_logps / safe_lengths(lp.chosen_lengths)


def log1mexp(x: jax.Array) -> jax.Array:
    """`log(1 - exp(x))` for x < 0, stable on both sides of -log 2 (Maechler 2012).

    Both branches see only inputs valid for them, so neither leaks an inf/NaN gradient through
    `where`; x is capped just below 0, where the function diverges.
    """
    x = jnp.minimum(x, -1e-7)
    t = -math.log(2.0)
    small = jnp.where(x < t, x, t)
    large = jnp.where(x < t, t, x)
    return jnp.where(x < t, jnp.log1p(-jnp.exp(small)), jnp.log(-jnp.expm1(large)))


@reference_free("sigmoid_reference_free", label_smoothing=0.0)
def sigmoid_reference_free(lp, *, beta, label_smoothing):
    """Reference-free DPO (DPO reference code's `reference_free=True`; arXiv 2305.18290).

    DPO with a uniform reference: `loss = -(1 - eps) log sigma(beta (logp_w - logp_l))
    - eps log sigma(-beta (logp_w - logp_l))`, eps = `label_smoothing`. Rewards `beta * logp`.
    `beta` is the inverse temperature of the policy-likelihood reward.
    """
    check_range("sigmoid_reference_free", "label_smoothing", label_smoothing, 0.0, 1.0)
    losses = smoothed_sigmoid_loss(beta * (lp.chosen_logps - lp.rejected_logps), label_smoothing)
    return LossOutput(losses, *policy_rewards(lp.chosen_logps, lp.rejected_logps, beta))


@reference_free("simpo", needs=LENGTH_FIELDS, simpo_gamma=0.5, label_smoothing=0.0)
def simpo(lp, *, beta, simpo_gamma, label_smoothing):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), with optional label smoothing.

    `loss = -log sigma(beta (a_w - a_l) - gamma)`, gamma = `simpo_gamma` (the target reward
    margin, default 0.5 as TRL; the paper tunes gamma/beta in [0.3, 1.6] with beta 2-2.5). `beta`
    scales the length-normalised reward `beta * a`, which is also the returned reward.
    No NLL term: combine with `sft` for TRL's CPO-SimPO (`cpo_alpha > 0`).
    """
    chosen, rejected = average_logps(lp)
    losses = smoothed_sigmoid_loss(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
    return LossOutput(losses, *policy_rewards(chosen, rejected, beta))


@reference_free("cpo", cpo_alpha=1.0, label_smoothing=0.0)
def cpo(lp, *, beta, cpo_alpha, label_smoothing):
    """CPO (Xu et al. 2024, arXiv 2401.08417, Eq. 3 plus the NLL regulariser).

    `loss = -(1 - eps) log sigma(beta (logp_w - logp_l)) - eps log sigma(-beta (...))
    + cpo_alpha * (-logp_w / |y_w|)`, eps = `label_smoothing`; `cpo_alpha` (default 1.0 as TRL)
    weights the chosen NLL, which needs `chosen_lengths`. `beta` is the reward temperature;
    rewards are `beta * logp`.
    """
    losses = smoothed_sigmoid_loss(beta * (lp.chosen_logps - lp.rejected_logps), label_smoothing)
    if not (isinstance(cpo_alpha, int | float) and cpo_alpha == 0):
        require("cpo", lp, "chosen_lengths")
        losses = losses + cpo_alpha * chosen_nll(lp)
    return LossOutput(losses, *policy_rewards(lp.chosen_logps, lp.rejected_logps, beta))


@reference_free("orpo", needs=LENGTH_FIELDS)
def orpo(lp, *, beta):
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4-7) on average log-probs.

    `log_odds = (a_w - a_l) - (log(1 - exp a_w) - log(1 - exp a_l))`,
    `loss = -a_w - beta * log sigma(log_odds)`. `beta` is the paper's lambda, the weight of the
    odds-ratio term relative to the NLL (default 0.1 in TRL). Rewards `beta * a`.
    """
    chosen, rejected = average_logps(lp)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -chosen - beta * jax.nn.log_sigmoid(log_odds)
    return LossOutput(losses, *policy_rewards(chosen, rejected, beta))


@reference_free("sft", needs=("chosen_lengths",))
def sft(lp, *, beta):
    """SFT term: the chosen response's per-token NLL `-logp_w / |y_w|` (`beta` unused).

    TRL's `sft` takes one token-mean over the whole batch; per pair we normalise by each
    response's length (identical for one pair, or equal lengths). Rewards `beta * (logp -
    ref_logp)` when the reference is given, else `beta * logp`.
    """
    if lp.ref_chosen_logps is None or lp.ref_rejected_logps is None:
        rewards = policy_rewards(lp.chosen_logps, lp.rejected_logps, beta)
    else:
        rewards = ratio_rewards(lp, beta)
    return LossOutput(chosen_nll(lp), *rewards)


# sft only reads policy log-probs, so an f-divergence (which transforms log-ratios) leaves it as
# it is; TRL lists it among the f-divergence-compatible losses for the same reason.
sft.score_based = True

LOSSES = (sigmoid_reference_free, simpo, cpo, orpo, sft)
