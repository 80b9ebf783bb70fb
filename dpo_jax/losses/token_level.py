"""Losses built on per-token log-probs of the responses, not only on their sums.

Unlikelihood: the DPO paper's baseline that raises the chosen response's likelihood and
pushes down every token of the rejected one (no reference model).

Welleck et al. 2019 (arXiv 1908.04319) introduced the token-level unlikelihood term
`log(1 - p(y_t | y_<t))` for tokens a model should not produce; the DPO paper (arXiv
2305.18290, Sec. 6 and App. C.3) uses it as a preference baseline on controlled sentiment:
"maximize log p(y_w|x) ... minimize log p(y_l|x)", with a coefficient alpha in [0, 1] on the
unlikelihood term (its sentiment sweep: 0.05, 0.1, 0.5, 1), and reports that it "produces
generally meaningless responses" on summarisation and dialogue, which it attributes to
unconstrained likelihood minimisation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpo_jax.losses.core import LossOutput, reference_free
from dpo_jax.losses.pairwise import check_range
from dpo_jax.losses.reference_free import policy_rewards

# log p is capped here before log(1 - p): at the cap the per-token penalty is -log(1 - p) =
# 16.1 and its slope in log p is -1e7, both finite in float32 (log p = 0, i.e. p rounded to 1,
# would give -inf and a NaN gradient).
MAX_TOKEN_LOGP = -1e-7


def log1m_prob(token_logps: jax.Array) -> jax.Array:
    """`log(1 - p)` from `log p` (float32, any shape), finite for every `log p <= 0`.

    `log p` is capped at `MAX_TOKEN_LOGP` in value only: the gradient passes through the cap
    unchanged (the slope there, -1e7, times d log p / d logits = onehot - softmax, which is
    ~0 when p ~ 1), so a token the model is sure of still gets pushed down instead of
    receiving no gradient at all, as a clamp would give it. Two branches as in Maechler
    (2012): `log1p(-exp(x))` below -log 2, `log(-expm1(x))` above, each fed only inputs valid
    for it so that `where` never selects an inf/NaN gradient.
    """
    x = token_logps + jax.lax.stop_gradient(jnp.minimum(token_logps, MAX_TOKEN_LOGP) - token_logps)
    t = -math.log(2.0)
    small = jnp.where(x < t, x, t)
    large = jnp.where(x < t, t, x)
    return jnp.where(x < t, jnp.log1p(-jnp.exp(small)), jnp.log(-jnp.expm1(large)))


def unlikelihood_term(token_logps: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """`sum_t log(1 - p_t)` over the scored tokens: `token_logps, loss_mask: [B, L]` -> `[B]`.

    Slots outside the mask may hold anything (padding, even -inf or NaN): they are replaced
    before the log and dropped after it, so neither their value nor their gradient leaks.
    """
    mask = loss_mask > 0
    safe = jnp.where(mask, token_logps, -1.0)
    return jnp.sum(jnp.where(mask, log1m_prob(safe), 0.0), axis=-1)


@reference_free(
    "unlikelihood",
    needs=("rejected_token_logps", "rejected_loss_mask"),
    terms=("unlikelihood",),
    alpha=1.0,
)
def unlikelihood(lp, *, beta, alpha):
    """Unlikelihood (Welleck et al. 2019, arXiv 1908.04319; the DPO paper's baseline, arXiv
    2305.18290 Sec. 6, App. C.3).

    `loss = -(logp_w + alpha * sum_t log(1 - p(y_l,t | x, y_l,<t)))`: the chosen response's
    log-likelihood plus alpha times the unlikelihood of every scored rejected token. The
    chosen term is the sequence log-prob `log p(y_w|x)` (a sum over tokens), which is what the
    paper says the baseline maximises; both terms are then sums over tokens, so alpha weighs
    like against like (a per-token mean would also weight pairs by 1 / |y_w|).
    alpha >= 0 (default 1.0, Welleck et al.'s; the DPO paper sweeps 0.05, 0.1, 0.5, 1).
    `beta` is unused by the loss (it must still be > 0); rewards are `beta * logp` like the
    other reference-free losses. Reported term (gradient-free, per pair): `unlikelihood`,
    `sum_t log(1 - p)` over the rejected tokens (<= 0; it rises towards 0 as their
    probabilities fall); the chosen log-prob is the step's `logps/chosen` metric.
    """
    check_range("unlikelihood", "alpha", alpha, 0.0, math.inf)
    term = unlikelihood_term(lp.rejected_token_logps, lp.rejected_loss_mask)
    losses = -(lp.chosen_logps + alpha * term)
    rewards = policy_rewards(lp.chosen_logps, lp.rejected_logps, beta)
    return LossOutput(losses, *rewards, {"unlikelihood": jax.lax.stop_gradient(term)})


LOSSES = (unlikelihood,)
