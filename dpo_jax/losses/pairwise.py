"""Reference-based pairwise preference losses (TRL `DPOTrainer` `loss_type` names).

Notation in the docstrings: `c = log pi(y_w|x) - log pi_ref(y_w|x)` and
`r = log pi(y_l|x) - log pi_ref(y_l|x)` are the chosen/rejected log-ratios (per-pair sums over
response tokens, `[B]`), `sigma` the logistic function, `|y|` the scored-token count. Under an
f-divergence (see `modifiers.f_divergence`) the score-based losses use `f'`-scores in place of
`c` and `r`. Every loss returns per-pair losses `[B]` and rewards `beta * c`, `beta * r`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.losses.core import LENGTH_FIELDS, pairwise, safe_lengths

log_sigmoid = jax.nn.log_sigmoid


def require(name: str, lp, *fields: str) -> None:
    """Raises a ValueError naming the loss and the first missing PreferenceLogps field."""
    for field in fields:
        if getattr(lp, field) is None:
            raise ValueError(f"loss '{name}' needs PreferenceLogps.{field}, got None")


def check_range(name: str, hparam: str, value, low: float, high: float) -> None:
    """Checks `low <= value < high` when the value is a Python number (not traced)."""
    if isinstance(value, int | float) and not low <= value < high:
        raise ValueError(f"loss '{name}': {hparam} must lie in [{low}, {high}), got {value}")


def smoothed_sigmoid_loss(z: jax.Array, label_smoothing) -> jax.Array:
    """`-(1 - eps) log sigma(z) - eps log sigma(-z)`: DPO loss with a label flipped w.p. eps."""
    return -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)


@pairwise("sigmoid", score_based=True, label_smoothing=0.0)
def sigmoid(lp, c, r, *, beta, label_smoothing):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290); conservative DPO with label smoothing.

    `loss = -(1 - eps) log sigma(beta (c - r)) - eps log sigma(-beta (c - r))`.
    `label_smoothing` = eps (default 0: plain DPO) is cDPO's probability that a preference label
    is flipped (Mitchell 2023, "A note on DPO with noisy preferences", as in the reference code
    eric-mitchell/direct-preference-optimization `preference_loss`). `beta` is the KL-penalty
    strength: the inverse temperature of the implicit reward `beta * log(pi / pi_ref)`.
    """
    check_range("sigmoid", "label_smoothing", label_smoothing, 0.0, 1.0)
    return smoothed_sigmoid_loss(beta * (c - r), label_smoothing)


@pairwise("hinge", score_based=True)
def hinge(lp, c, r, *, beta):
    """SLiC hinge loss (Zhao et al. 2023, arXiv 2305.10425): `max(0, 1 - beta (c - r))`.

    `beta` is the inverse of the required margin: the loss is zero once `c - r >= 1 / beta`.
    """
    return jax.nn.relu(1.0 - beta * (c - r))


@pairwise("ipo", score_based=True, length_normalized=True)
def ipo(lp, c, r, *, beta, length_normalized):
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): `(c' - r' - 1 / (2 beta))^2`.

    `length_normalized=True` (TRL's form, default) uses `c' = c / |y_w|`, `r' = r / |y_l|`;
    False uses the paper's/reference code's summed log-ratios `c' = c`, `r' = r`. `beta` is the
    regularisation strength tau: the loss is minimised at margin `c' - r' = 1 / (2 beta)`.
    """
    if length_normalized:
        require("ipo", lp, *LENGTH_FIELDS)
        c = c / safe_lengths(lp.chosen_lengths)
        r = r / safe_lengths(lp.rejected_lengths)
    return (c - r - 1.0 / (2.0 * beta)) ** 2


@pairwise("exo_pair", score_based=True, label_smoothing=1e-3)
def exo_pair(lp, c, r, *, beta, label_smoothing):
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, Eq. 16): reverse KL to smoothed labels.

    With `q = sigma(beta (c - r))` and eps = `label_smoothing` (must be in (0, 1); the paper and
    TRL recommend 1e-3, our default; TRL's global default 0 is rejected by TRL for exo_pair):
    `loss = q (log q - log(1 - eps)) + (1 - q) (log(1 - q) - log eps)`. `beta` is the inverse
    temperature of the policy's implicit preference distribution.
    """
    if isinstance(label_smoothing, int | float) and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"loss 'exo_pair': label_smoothing must lie in (0, 1), got {label_smoothing}"
        )
    z = beta * (c - r)
    log_q_w, log_q_l = log_sigmoid(z), log_sigmoid(-z)
    return jnp.exp(log_q_w) * (log_q_w - jnp.log1p(-label_smoothing)) + jnp.exp(log_q_l) * (
        log_q_l - jnp.log(label_smoothing)
    )


@pairwise("nca_pair")
def nca_pair(lp, c, r, *, beta):
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369).

    `loss = -log sigma(beta c) - 0.5 log sigma(-beta c) - 0.5 log sigma(-beta r)`: absolute
    rewards, so the chosen likelihood is not pushed down with the rejected one. `beta` is the
    reward scale `beta * log(pi / pi_ref)`.
    """
    return -log_sigmoid(beta * c) - 0.5 * log_sigmoid(-beta * c) - 0.5 * log_sigmoid(-beta * r)


@pairwise("robust", score_based=True, label_smoothing=0.0)
def robust(lp, c, r, *, beta, label_smoothing):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), unbiased under label noise eps.

    `loss = [-(1 - eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps)`, `z = beta (c - r)`,
    eps = `label_smoothing` in [0, 0.5) (0 gives DPO). `beta` as in DPO.
    """
    check_range("robust", "label_smoothing", label_smoothing, 0.0, 0.5)
    z = beta * (c - r)
    return (-(1.0 - label_smoothing) * log_sigmoid(z) + label_smoothing * log_sigmoid(-z)) / (
        1.0 - 2.0 * label_smoothing
    )


@pairwise("bco_pair", reward_baseline=0.0)
def bco_pair(lp, c, r, *, beta, reward_baseline):
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656): binary classifier of rewards.

    `loss = -log sigma(beta c - delta) - log sigma(-(beta r - delta))` with `delta` =
    `reward_baseline`, the running mean of past rewards. The function stays pure: the caller
    keeps the baseline and updates it with `bco_baseline_update` from the returned rewards.
    With `reward_baseline=0` (default) this is TRL 1.16's `bco_pair`. `beta` is the reward scale.
    """
    return -log_sigmoid(beta * c - reward_baseline) - log_sigmoid(reward_baseline - beta * r)


def bco_baseline_update(baseline, count, chosen_rewards, rejected_rewards, pair_mask=None):
    """Running mean of BCO rewards: folds a batch's `[B]` rewards into `(baseline, count)`.

    Both rewards of every real pair (pair_mask 1) count once. Returns the new (baseline, count).
    """
    mask = jnp.ones_like(chosen_rewards) if pair_mask is None else pair_mask.astype(jnp.float32)
    batch_sum = jnp.sum((chosen_rewards + rejected_rewards) * mask)
    batch_count = 2.0 * jnp.sum(mask)
    new_count = count + batch_count
    new_baseline = (baseline * count + batch_sum) / jnp.maximum(new_count, 1.0)
    return new_baseline, new_count


@pairwise("sppo_hard")
def sppo_hard(lp, c, r, *, beta):
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P in {0,1}).

    `loss = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2`. `beta` is 1/eta of the paper: the
    chosen/rejected log-ratios are regressed to +-1/(2 beta).
    """
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


@pairwise("aot", label_smoothing=0.0)
def aot(lp, c, r, *, beta, label_smoothing):
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882): distributional dominance via sorting.

    `delta = sort_B(logp_w - logp_l) - sort_B(ref_logp_w - ref_logp_l)`, then the
    (label-smoothed) DPO loss of `beta * delta`. The batch is sorted, so entry i of the result
    is the i-th quantile term, not pair i's loss (only its mean is meaningful); padding pairs
    take part in the sort. `beta` as in DPO.
    """
    delta = jnp.sort(lp.chosen_logps - lp.rejected_logps) - jnp.sort(
        lp.ref_chosen_logps - lp.ref_rejected_logps
    )
    return smoothed_sigmoid_loss(beta * delta, label_smoothing)


@pairwise("aot_unpaired", label_smoothing=0.0)
def aot_unpaired(lp, c, r, *, beta, label_smoothing):
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): `delta = sort_B(c) - sort_B(r)`.

    Then the (label-smoothed) DPO loss of `beta * delta`; entries are quantile terms (see
    `aot`). `beta` as in DPO.
    """
    return smoothed_sigmoid_loss(beta * (jnp.sort(c) - jnp.sort(r)), label_smoothing)


@pairwise("apo_zero")
def apo_zero(lp, c, r, *, beta):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7).

    `loss = (1 - sigma(beta c)) + sigma(beta r)`: raise the chosen likelihood, lower the
    rejected one (chosen outputs better than the model's). `beta` is the reward scale.
    """
    return jax.nn.sigmoid(-beta * c) + jax.nn.sigmoid(beta * r)


@pairwise("apo_down")
def apo_down(lp, c, r, *, beta):
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8).

    `loss = sigma(beta c) + (1 - sigma(beta (c - r)))`: lower both likelihoods, the rejected
    more (chosen outputs worse than the model's). `beta` is the reward scale.
    """
    return jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(-beta * (c - r))


@pairwise("discopop", score_based=True, discopop_tau=0.05)
def discopop(lp, c, r, *, beta, discopop_tau):
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, Eq. 5).

    With `z = beta (c - r)` and `m = sigma(z / tau)`, tau = `discopop_tau` (default 0.05):
    `loss = (1 - m) (-log sigma(z)) + m exp(-z)`. The exponential term is evaluated as
    `exp(-z + log sigma(z / tau))` so that it stays finite at large negative margins (tau < 1).
    `beta` as in DPO.
    """
    z = beta * (c - r)
    logistic = jax.nn.softplus(-z) * jax.nn.sigmoid(-z / discopop_tau)
    return logistic + jnp.exp(-z + log_sigmoid(z / discopop_tau))


@pairwise("sigmoid_norm", score_based=True, needs=LENGTH_FIELDS)
def sigmoid_norm(lp, c, r, *, beta):
    """Length-normalised DPO (TRL's `sigmoid_norm`; DPO, arXiv 2305.18290, per token).

    `loss = -log sigma(beta (c / |y_w| - r / |y_l|))`. `beta` scales per-token log-ratios, so it
    is typically much larger than DPO's.
    """
    margin = c / safe_lengths(lp.chosen_lengths) - r / safe_lengths(lp.rejected_lengths)
    return -log_sigmoid(beta * margin)


@pairwise("rpo", needs=("chosen_lengths",), rpo_alpha=1.0)
def rpo(lp, c, r, *, beta, rpo_alpha):
    """RPO: DPO plus a chosen NLL term (Pang et al. 2024, arXiv 2404.19733).

    `loss = -log sigma(beta (c - r)) - rpo_alpha * logp_w / |y_w|` (the NLL is normalised by
    the chosen length, as in TRL's former `rpo_alpha`). `beta` as in DPO.
    """
    return -log_sigmoid(beta * (c - r)) - rpo_alpha * lp.chosen_logps / safe_lengths(
        lp.chosen_lengths
    )


# Sorting the batch makes entry i a quantile term, not pair i's loss (WPO cannot weight it).
aot.per_pair = False
aot_unpaired.per_pair = False

LOSSES = (
    sigmoid,
    hinge,
    ipo,
    exo_pair,
    nca_pair,
    robust,
    bco_pair,
    sppo_hard,
    aot,
    aot_unpaired,
    apo_zero,
    apo_down,
    discopop,
    sigmoid_norm,
    rpo,
)
