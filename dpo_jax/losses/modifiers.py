"""Modifiers that wrap a base loss (f-DPO divergences, WPO weights, LD-DPO length weighting)
and weighted combinations of losses (MPO-style; TRL's `loss_type` list + `loss_weights`).

`build(...)` assembles them from TRL-named options, in TRL's order: LD-DPO reweights the
log-prob sums, the f-divergence turns log-ratios into scores, each base loss is evaluated, WPO
weights multiply each pair's loss, and the weighted losses are summed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dpo_jax.losses.core import Loss, LossOutput, log_ratios
from dpo_jax.losses.registry import get

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp() of a larger argument would overflow float32 (TRL clamps the alpha-divergence likewise).
_MAX_EXPONENT = 80.0


def f_divergence_scores(log_ratio: jax.Array, f_divergence_type: str, f_alpha_divergence_coef=0.5):
    """`f'(pi / pi_ref)` as a function of the log-ratio (f-DPO, Wang et al. 2023, arXiv 2309.16240).

    reverse_kl: `log t` (DPO); forward_kl: `1 - 1/t`; js_divergence: `log 2 + log sigma(log t)`
    (= log(2t / (1 + t))); alpha_divergence with alpha = `f_alpha_divergence_coef`:
    `(t^(alpha - 1) - 1) / (alpha - 1)` (-> log t as alpha -> 1). These are TRL's forms; constants
    cancel in the chosen-rejected difference. Exponents are capped at 80 to stay finite.
    """
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(jnp.minimum(-log_ratio, _MAX_EXPONENT))
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            return log_ratio
        a = f_alpha_divergence_coef - 1.0
        return (jnp.exp(jnp.minimum(a * log_ratio, _MAX_EXPONENT)) - 1.0) / a
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; known: {F_DIVERGENCES}")


def f_divergence(loss, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5):
    """f-DPO (Wang et al. 2023, arXiv 2309.16240): the base loss on `f'`-scores of the log-ratios.

    The chosen/rejected log-ratios `c, r` of a score-based loss (sigmoid, sigmoid_norm, hinge,
    ipo, exo_pair, robust, discopop, sft, and combinations of them) are replaced by
    `f_divergence_scores(c), f_divergence_scores(r)`; rewards stay `beta * (logp - ref_logp)`.
    Other losses have no valid f-divergence form (the log Z(x) term only cancels in `c - r`).
    `beta` keeps its base-loss meaning, now the weight of the f-divergence regulariser.
    """
    loss = get(loss)
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; known: {F_DIVERGENCES}")
    if f_divergence_type == "reverse_kl" or not loss.requires_reference:
        return loss
    if not loss.score_based:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} does not apply to loss '{loss.name}'; it "
            "only applies to: sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft"
        )

    def core(lp, scores, *, beta, **hparams):
        del scores
        chosen, rejected = log_ratios(lp)
        scores = tuple(
            f_divergence_scores(x, f_divergence_type, f_alpha_divergence_coef)
            for x in (chosen, rejected)
        )
        return loss.core(lp, scores, beta=beta, **hparams)

    return _wrapped(loss, f"{loss.name}[{f_divergence_type}]", core)


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    # where, not multiply: per-token log-probs outside the mask may be anything (even -inf).
    return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)


_TOKEN_FIELDS = (
    "chosen_token_logps",
    "rejected_token_logps",
    "chosen_loss_mask",
    "rejected_loss_mask",
)
_SUM_SQ_FIELDS = ("chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs")


def wpo_weights(lp, alignment: bool = True) -> jax.Array:
    """WPO pair weights `[B]` (Zhou et al. 2024, arXiv 2406.11827, Eq. 2), without gradient.

    Per response `w = exp(mean_t (log p(y_t) - log sum_v p(v)^2))` over its scored tokens (the
    paper's aligned weight, TRL's `use_weighting`); `alignment=False` drops the `sum_v p(v)^2`
    term (the unaligned `exp(mean_t log p(y_t))`). The pair weight is `w_chosen * w_rejected`.
    """
    weights = []
    for side in ("chosen", "rejected"):
        mask = getattr(lp, f"{side}_loss_mask") > 0
        token_logps = getattr(lp, f"{side}_token_logps")
        if alignment:
            token_logps = token_logps - getattr(lp, f"{side}_log_sum_sq_probs")
        length = jnp.maximum(jnp.sum(mask, axis=-1).astype(jnp.float32), 1.0)
        weights.append(jnp.exp(_masked_sum(token_logps, mask) / length))
    return jax.lax.stop_gradient(weights[0] * weights[1])


def wpo_weighted(loss, alignment: bool = True) -> Loss:
    """WPO (arXiv 2406.11827): each pair's loss times `wpo_weights(...)` (off-policy reweighting).

    Needs `chosen/rejected_token_logps`, `chosen/rejected_loss_mask` (and, with alignment,
    `chosen/rejected_log_sum_sq_probs`), all `[B, L]`. `beta` is the base loss's.
    """
    loss = get(loss)
    if not loss.per_pair:
        raise ValueError(
            f"WPO weighting does not apply to loss '{loss.name}': it sorts the batch, so its "
            "entries are not per-pair losses"
        )
    fields = _TOKEN_FIELDS + (_SUM_SQ_FIELDS if alignment else ())

    def core(lp, scores, *, beta, **hparams):
        out = loss.core(lp, scores, beta=beta, **hparams)
        return out._replace(losses=out.losses * wpo_weights(lp, alignment))

    return _wrapped(loss, f"{loss.name}[wpo]", core, extra_needs=fields)


def ld_logps(token_logps, loss_mask, shared_lengths, ld_alpha) -> jax.Array:
    """LD-DPO sum `[B]`: the first `shared_lengths` scored tokens in full, the rest times alpha.

    `token_logps, loss_mask: [B, L]`; `shared_lengths: [B]` = min(|y_w|, |y_l|) (the public
    length of the pair).
    """
    mask = loss_mask > 0
    position = jnp.cumsum(mask, axis=-1)  # 1-based index of each scored token in its response
    shared = mask & (position <= shared_lengths[:, None])
    tail = mask & (position > shared_lengths[:, None])
    return _masked_sum(token_logps, shared) + ld_alpha * _masked_sum(token_logps, tail)


def ld_weighted(loss, ld_alpha: float) -> Loss:
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411): desensitise the loss to verbosity.

    Every log-prob sum (policy and reference, chosen and rejected) is recomputed from per-token
    arrays as `sum_{t <= l_p} log p_t + ld_alpha * sum_{t > l_p} log p_t`, with public length
    `l_p = min(|y_w|, |y_l|)`; the given `*_logps` sums are replaced, token counts are kept.
    `ld_alpha` in [0, 1] (1 = no change). `beta` is the base loss's.
    """
    loss = get(loss)
    if isinstance(ld_alpha, int | float) and not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    ref_fields = ("ref_chosen_token_logps", "ref_rejected_token_logps")
    needs = _TOKEN_FIELDS + (ref_fields if loss.requires_reference else ())

    def core(lp, scores, *, beta, **hparams):
        chosen_mask, rejected_mask = lp.chosen_loss_mask > 0, lp.rejected_loss_mask > 0
        shared = jnp.minimum(jnp.sum(chosen_mask, axis=-1), jnp.sum(rejected_mask, axis=-1))
        sums = {
            "chosen_logps": ld_logps(lp.chosen_token_logps, chosen_mask, shared, ld_alpha),
            "rejected_logps": ld_logps(lp.rejected_token_logps, rejected_mask, shared, ld_alpha),
        }
        if lp.ref_chosen_token_logps is not None and lp.ref_rejected_token_logps is not None:
            sums["ref_chosen_logps"] = ld_logps(
                lp.ref_chosen_token_logps, chosen_mask, shared, ld_alpha
            )
            sums["ref_rejected_logps"] = ld_logps(
                lp.ref_rejected_token_logps, rejected_mask, shared, ld_alpha
            )
        return loss.core(lp._replace(**sums), scores, beta=beta, **hparams)

    return _wrapped(loss, f"{loss.name}[ld]", core, extra_needs=needs)


def _wrapped(loss: Loss, name: str, core, extra_needs: tuple[str, ...] = ()) -> Loss:
    return Loss(
        name,
        core,
        requires_reference=loss.requires_reference,
        hparams=loss.hparams,
        needs=(*loss.needs, *extra_needs),
        score_based=loss.score_based,
        per_pair=loss.per_pair,
        terms=loss.terms,
        doc=loss.__doc__,
    )


def combine(losses: Sequence, weights: Sequence[float] | None = None) -> Loss:
    """Weighted sum of losses (MPO-style, e.g. Wang et al. 2024 arXiv 2411.10442; TRL's list of
    `loss_type` with `loss_weights`): `loss_i = sum_k w_k loss_k,i`.

    `losses`: names/Loss objects with `weights` (default all 1), or `(name, weight)` pairs:
    `combine([("sigmoid", 0.8), ("bco_pair", 0.2)])` == `combine(["sigmoid", "bco_pair"],
    [0.8, 0.2])`. Each hyperparameter passed at call time goes to every member that accepts it;
    members keep their own defaults. Rewards are the first member's. `beta` is shared.
    """
    if weights is None:
        pairs = [item if isinstance(item, tuple) else (item, 1.0) for item in losses]
    else:
        if len(weights) != len(losses):
            raise ValueError(
                f"loss_weights must have one weight per loss: {len(weights)} weights for "
                f"{len(losses)} losses"
            )
        pairs = list(zip(losses, weights, strict=True))
    if not pairs:
        raise ValueError("combine() needs at least one loss")
    members = [(get(item), float(weight)) for item, weight in pairs]

    def core(lp, scores, *, beta, **hparams):
        total, first = 0.0, None
        for member, weight in members:
            own = {k: v for k, v in hparams.items() if k in member.hparams}
            out = member.core(lp, scores, beta=beta, **own)
            total = total + weight * out.losses
            first = out if first is None else first
        return LossOutput(total, first.chosen_rewards, first.rejected_rewards)

    hparams = {}
    for member, _ in members:
        hparams = {**member.hparams, **hparams}
    return Loss(
        " + ".join(f"{weight:g}*{member.name}" for member, weight in members),
        core,
        requires_reference=any(m.requires_reference for m, _ in members),
        hparams=hparams,
        needs=tuple(field for m, _ in members for field in m.needs),
        score_based=all(m.score_based for m, _ in members),
        per_pair=all(m.per_pair for m, _ in members),
        doc=combine.__doc__,
    )


def build(
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    *,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    wpo_alignment: bool = True,
    ld_alpha: float | None = None,
) -> Loss:
    """The loss TRL's `DPOConfig` options describe (same names and defaults).

    Returns a `Loss` called as `fn(logps, *, beta, **hparams)`; e.g.
    `build(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])` is MPO, `build("sigmoid",
    ld_alpha=0.5)` is LD-DPO, `build("sigmoid", use_weighting=True)` is WPO.
    """
    types = [loss_type] if isinstance(loss_type, str | Loss) else list(loss_type)
    members = [f_divergence(t, f_divergence_type, f_alpha_divergence_coef) for t in types]
    if len(members) == 1 and loss_weights is None:
        loss = members[0]
    else:
        loss = combine(members, loss_weights if loss_weights is not None else [1.0] * len(members))
    if ld_alpha is not None:
        loss = ld_weighted(loss, ld_alpha)
    if use_weighting:
        loss = wpo_weighted(loss, wpo_alignment)
    return loss
