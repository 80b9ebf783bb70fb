"""dpo_jax.losses: closed-form values, analytic gradients, stability, registry and errors.

(Parity with TRL's own code is in test_losses_trl.py.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses

TRL_DPO_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
REFERENCE_FREE = ["sigmoid_reference_free", "simpo", "cpo", "orpo", "sft"]
# Reference-free losses of per-token log-probs (tests/test_unlikelihood.py).
TOKEN_LEVEL = ["unlikelihood"]


def pairs(c, r, *, chosen=-10.0, rejected=-12.0, lengths=(4.0, 5.0)):
    """PreferenceLogps `[B]` with chosen/rejected log-ratios c, r (arrays or scalars)."""
    c, r = jnp.atleast_1d(jnp.asarray(c, jnp.float32)), jnp.atleast_1d(jnp.asarray(r, jnp.float32))
    full = lambda v: jnp.full_like(c, v)
    return losses.PreferenceLogps(
        chosen_logps=full(chosen) + c,
        rejected_logps=full(rejected) + r,
        ref_chosen_logps=full(chosen),
        ref_rejected_logps=full(rejected),
        chosen_lengths=full(lengths[0]),
        rejected_lengths=full(lengths[1]),
    )


def close(a, b, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- registry


def test_names_cover_trl_and_reference_free_losses():
    assert set(TRL_DPO_LOSS_TYPES + REFERENCE_FREE + TOKEN_LEVEL + ["rpo"]) == set(losses.names())
    assert losses.unpaired_names() == ["apo_zero_unpaired", "kto"]
    for name in losses.names() + losses.unpaired_names():
        loss = losses.get(name)
        assert loss.name == name and loss.__doc__ and "arXiv" in loss.__doc__ or name == "sft"
        assert losses.requires_reference(name) == (name not in REFERENCE_FREE + TOKEN_LEVEL)


@pytest.mark.parametrize("name", REFERENCE_FREE)
def test_reference_free_losses_run_without_reference(name):
    lp = pairs([0.5, -1.0], [0.0, 2.0])._replace(ref_chosen_logps=None, ref_rejected_logps=None)
    out = losses.get(name)(lp, beta=0.5)
    assert out.losses.shape == (2,) and np.all(np.isfinite(out.losses))


@pytest.mark.parametrize("name", sorted(set(TRL_DPO_LOSS_TYPES) - {"sft"}) + ["rpo"])
def test_reference_losses_name_missing_reference(name):
    lp = pairs(0.0, 0.0)._replace(ref_rejected_logps=None)
    with pytest.raises(ValueError, match=f"loss '{name}' needs PreferenceLogps.ref_rejected_logps"):
        losses.get(name)(lp, beta=0.1)


def test_bad_inputs_raise_clear_errors():
    lp = pairs(0.0, 0.0)
    with pytest.raises(
        ValueError, match=r"loss 'sigmoid': unknown hyperparameter\(s\) \['gamma'\]"
    ):
        losses.get("sigmoid")(lp, beta=0.1, gamma=1.0)
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        losses.get("dpo")
    with pytest.raises(ValueError, match="beta must be > 0"):
        losses.get("ipo")(lp, beta=0.0)
    with pytest.raises(ValueError, match="needs PreferenceLogps.chosen_lengths"):
        losses.get("simpo")(lp._replace(chosen_lengths=None), beta=2.0)
    with pytest.raises(ValueError, match="ref_chosen_logps has shape"):
        losses.get("sigmoid")(lp._replace(ref_chosen_logps=jnp.zeros(3)), beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        losses.get("robust")(lp, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        losses.get("exo_pair")(lp, beta=0.1, label_smoothing=0.0)
    with pytest.raises(ValueError, match="does not apply to loss 'nca_pair'"):
        losses.build("nca_pair", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="WPO weighting does not apply to loss 'aot'"):
        losses.build("aot", use_weighting=True)
    with pytest.raises(ValueError, match="needs PreferenceLogps.chosen_token_logps"):
        losses.build("sigmoid", ld_alpha=0.5)(lp, beta=0.1)
    with pytest.raises(ValueError, match="one weight per loss"):
        losses.combine(["sigmoid", "hinge"], [1.0])
    with pytest.raises(ValueError, match="needs UnpairedLogps.kl"):
        losses.get("kto")(losses.UnpairedLogps(jnp.zeros(2), jnp.zeros(2), jnp.ones(2)), beta=0.1)


# ---------------------------------------------------------------- closed forms

BETA = 0.25


@pytest.mark.parametrize(
    "name,expected",
    [
        ("sigmoid", math.log(2)),
        ("robust", math.log(2)),
        ("hinge", 1.0),
        ("ipo", (1 / (2 * BETA)) ** 2),
        ("nca_pair", 2 * math.log(2)),
        ("bco_pair", 2 * math.log(2)),
        ("sppo_hard", 2 * (0.5 / BETA) ** 2),
        ("apo_zero", 1.0),
        ("apo_down", 1.0),
        ("discopop", 0.5 * math.log(2) + 0.5),
        ("sigmoid_norm", math.log(2)),
        ("aot", math.log(2)),
        ("aot_unpaired", math.log(2)),
        ("exo_pair", 0.5 * (2 * math.log(0.5) - math.log1p(-1e-3) - math.log(1e-3))),
    ],
)  # fmt: skip
def test_values_at_zero_log_ratios(name, expected):
    out = losses.get(name)(pairs([0.0, 0.0], [0.0, 0.0]), beta=BETA)
    close(out.losses, [expected, expected])
    close(out.chosen_rewards, [0.0, 0.0])


def test_sigmoid_is_softplus_of_negative_margin():
    c, r = np.array([3.0, -2.0, 0.5]), np.array([-1.0, 4.0, 0.5])
    out = losses.sigmoid(pairs(c, r), beta=BETA)
    close(out.losses, np.log1p(np.exp(-BETA * (c - r))))
    close(out.chosen_rewards, BETA * c)
    close(out.rejected_rewards, BETA * r)


def test_label_smoothing_half_is_symmetric_in_the_margin():
    m = np.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    out = losses.sigmoid(pairs(m, 0.0 * m), beta=1.0, label_smoothing=0.5)
    close(out.losses, out.losses[::-1])  # eps = 1/2: no preference information left
    close(out.losses, 0.5 * (np.log1p(np.exp(-m)) + np.log1p(np.exp(m))))
    grad = jax.grad(
        lambda c: losses.sigmoid(pairs(c, 0.0), beta=1.0, label_smoothing=0.5).losses.sum()
    )
    close(grad(jnp.zeros(1)), [0.0])


@pytest.mark.parametrize("length_normalized", [True, False])
def test_ipo_minimum_at_half_inverse_beta(length_normalized):
    lengths = (4.0, 5.0)
    target = 1 / (2 * BETA)
    # margin of the (normalised) log-ratios equal to 1/(2 beta): put it all on the chosen side
    c = target * (lengths[0] if length_normalized else 1.0)
    fn = lambda c: losses.ipo(
        pairs(c, 0.0, lengths=lengths), beta=BETA, length_normalized=length_normalized
    ).losses.sum()
    close(fn(jnp.float32(c)), 0.0)
    close(jax.grad(fn)(jnp.float32(c)), 0.0)
    assert fn(jnp.float32(c + 0.5)) > 0 and fn(jnp.float32(c - 0.5)) > 0


def test_hinge_is_zero_beyond_margin_inverse_beta():
    m = np.array([1 / BETA + 0.5, 1 / BETA + 10.0, 1 / BETA - 1.0])
    out = losses.hinge(pairs(m, 0.0 * m), beta=BETA)
    close(out.losses, [0.0, 0.0, BETA * 1.0])


def test_sppo_hard_zero_at_targets():
    out = losses.sppo_hard(pairs(0.5 / BETA, -0.5 / BETA), beta=BETA)
    close(out.losses, [0.0])


def test_robust_without_noise_is_dpo_and_unbiased_with_noise():
    lp = pairs([1.0, -2.0], [0.0, 1.0])
    close(losses.robust(lp, beta=BETA).losses, losses.sigmoid(lp, beta=BETA).losses)
    # Unbiasedness: E over a label flipped w.p. eps of the robust loss = the clean DPO loss.
    eps, flipped = 0.2, pairs([0.0, 1.0], [1.0, -2.0])
    expected = (1 - eps) * losses.robust(lp, beta=BETA, label_smoothing=eps).losses + eps * (
        losses.robust(flipped, beta=BETA, label_smoothing=eps).losses
    )
    close(expected, losses.sigmoid(lp, beta=BETA).losses, rtol=1e-5)


def test_reference_free_sigmoid_equals_dpo_with_uniform_reference():
    lp = pairs([1.0, -2.0], [0.5, 3.0], chosen=0.0, rejected=0.0)
    free = losses.sigmoid_reference_free(lp._replace(ref_chosen_logps=None), beta=BETA)
    close(free.losses, losses.sigmoid(lp, beta=BETA).losses)


def test_simpo_orpo_cpo_rpo_formulas():
    lp = pairs([0.0], [0.0], chosen=-2.0, rejected=-4.0, lengths=(4.0, 5.0))
    a_w, a_l = -2.0 / 4, -4.0 / 5
    sp = lambda x: math.log1p(math.exp(-x))  # -log sigma(x)
    close(losses.simpo(lp, beta=2.0, simpo_gamma=0.5).losses, [sp(2.0 * (a_w - a_l) - 0.5)])
    log_odds = (a_w - a_l) - (math.log(1 - math.exp(a_w)) - math.log(1 - math.exp(a_l)))
    close(losses.orpo(lp, beta=0.1).losses, [-a_w + 0.1 * sp(log_odds)])
    close(losses.cpo(lp, beta=0.1, cpo_alpha=2.0).losses, [sp(0.1 * 2.0) + 2.0 * 0.5])
    close(losses.rpo(lp, beta=0.1, rpo_alpha=0.3).losses, [math.log(2) + 0.3 * 0.5])
    close(losses.sft(lp, beta=0.1).losses, [0.5])


def test_kto_closed_form_and_kl_estimate():
    kl = losses.kto_kl_estimate(jnp.array([-5.0, -3.0]), jnp.array([-6.0, -3.0]))
    close(kl, 0.5)
    close(losses.kto_kl_estimate(jnp.array([-5.0]), jnp.array([-1.0])), 0.0)  # clamped at 0
    lp = losses.UnpairedLogps(
        logps=jnp.array([-1.5, -1.5, -4.0]),
        ref_logps=jnp.array([-2.0, -2.0, -2.0]),
        labels=jnp.array([1, 0, 0]),
        kl=kl,
    )
    out = losses.kto(lp, beta=1.0, desirable_weight=2.0, undesirable_weight=3.0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    close(out.losses, [2.0 * 0.5, 3.0 * 0.5, 3.0 * (1 - sig(0.5 + 2.0))])
    close(out.rewards, [0.5, 0.5, -2.0])


def test_bco_baseline_is_a_running_mean():
    lp = pairs([1.0, 3.0], [-1.0, 0.0])
    base, count = losses.bco_baseline_update(
        0.0, 0.0, jnp.array([1.0, 3.0]), jnp.array([-1.0, 0.0])
    )
    close((base, count), (0.75, 4.0))
    base, count = losses.bco_baseline_update(
        base, count, jnp.array([5.0, 9.0]), jnp.array([7.0, 9.0]), pair_mask=jnp.array([1, 0])
    )
    close((base, count), ((3.0 + 12.0) / 6, 6.0))
    out = losses.bco_pair(lp, beta=1.0, reward_baseline=0.5)
    sp = lambda x: np.log1p(np.exp(-x))
    close(out.losses, sp(np.array([0.5, 2.5])) + sp(np.array([1.5, 0.5])))


# ---------------------------------------------------------------- modifiers


def token_pairs(rng, b=3, l=7):
    tok = lambda: jnp.asarray(-rng.exponential(1.0, (b, l)), jnp.float32)
    mask_c = jnp.asarray(np.arange(l) >= np.array([[2], [0], [5]]), jnp.float32)
    mask_r = jnp.asarray(np.arange(l) >= np.array([[4], [1], [3]]), jnp.float32)
    pc, pr, rc, rr = tok(), tok(), tok(), tok()
    s = lambda x, m: jnp.sum(x * m, -1)
    return losses.PreferenceLogps(
        s(pc, mask_c), s(pr, mask_r), s(rc, mask_c), s(rr, mask_r),
        jnp.sum(mask_c, -1), jnp.sum(mask_r, -1),
        pc, pr, rc, rr, mask_c, mask_r, tok() * 0.1, tok() * 0.1,
    )  # fmt: skip


def test_ld_dpo_limits():
    lp = token_pairs(np.random.default_rng(0))
    base = losses.sigmoid(lp, beta=BETA).losses
    close(losses.build("sigmoid", ld_alpha=1.0)(lp, beta=BETA).losses, base)
    # alpha = 0: only the first min(|y_w|, |y_l|) response tokens of each side count.
    shared = jnp.minimum(lp.chosen_lengths, lp.rejected_lengths)
    keep = lambda m: m * (jnp.cumsum(m, -1) <= shared[:, None])
    mc, mr = keep(lp.chosen_loss_mask), keep(lp.rejected_loss_mask)
    truncated = lp._replace(
        chosen_logps=jnp.sum(lp.chosen_token_logps * mc, -1),
        rejected_logps=jnp.sum(lp.rejected_token_logps * mr, -1),
        ref_chosen_logps=jnp.sum(lp.ref_chosen_token_logps * mc, -1),
        ref_rejected_logps=jnp.sum(lp.ref_rejected_token_logps * mr, -1),
    )
    close(
        losses.build("sigmoid", ld_alpha=0.0)(lp, beta=BETA).losses,
        losses.sigmoid(truncated, beta=BETA).losses,
    )


def test_wpo_weights_and_stop_gradient():
    lp = token_pairs(np.random.default_rng(1))
    mean = lambda x, m, s: jnp.sum((x - s) * m, -1) / jnp.sum(m, -1)
    w_chosen = mean(lp.chosen_token_logps, lp.chosen_loss_mask, lp.chosen_log_sum_sq_probs)
    w_rejected = mean(lp.rejected_token_logps, lp.rejected_loss_mask, lp.rejected_log_sum_sq_probs)
    w = jnp.exp(w_chosen) * jnp.exp(w_rejected)
    close(losses.wpo_weights(lp), w)
    out = losses.build("sigmoid", use_weighting=True)(lp, beta=BETA)
    close(out.losses, w * losses.sigmoid(lp, beta=BETA).losses)
    unaligned = losses.wpo_weighted("sigmoid", alignment=False)
    lp_no_sq = lp._replace(chosen_log_sum_sq_probs=None, rejected_log_sum_sq_probs=None)
    assert np.isfinite(unaligned(lp_no_sq, beta=BETA).losses).all()
    # The weights carry no gradient: d/d token_logps only flows through the summed logps.
    g = jax.grad(
        lambda t: losses.build("sigmoid", use_weighting=True)(
            lp._replace(chosen_token_logps=t), beta=BETA
        ).losses.sum()
    )(lp.chosen_token_logps)
    close(g, 0.0)


def test_f_divergence_scores_and_reverse_kl_identity():
    lp = pairs([1.0, -0.5], [0.3, 2.0])
    close(losses.build("sigmoid", f_divergence_type="reverse_kl")(lp, beta=BETA).losses,
          losses.sigmoid(lp, beta=BETA).losses)  # fmt: skip
    t = np.array([-1.0, 0.0, 2.0])
    close(
        losses.f_divergence_scores(jnp.array(t), "js_divergence"),
        np.log(2 * np.exp(t) / (1 + np.exp(t))),
    )
    close(losses.f_divergence_scores(jnp.array(t), "forward_kl"), 1 - np.exp(-t))
    close(
        losses.f_divergence_scores(jnp.array(t), "alpha_divergence", 0.5),
        (np.exp(-0.5 * t) - 1) / -0.5,
    )
    # js at zero log-ratios: scores are 0, so the loss is log 2; rewards stay beta * log-ratio.
    out = losses.build("sigmoid", f_divergence_type="js_divergence")(pairs(0.0, 0.0), beta=BETA)
    close(out.losses, [math.log(2)])


def test_combine_is_linear_and_routes_hparams():
    lp = pairs([1.0, -0.5], [0.3, 2.0])
    combo = losses.combine([("sigmoid", 0.8), ("exo_pair", 0.2)])
    out = combo(lp, beta=BETA)  # each member keeps its own label_smoothing default
    close(
        out.losses,
        0.8 * losses.sigmoid(lp, beta=BETA).losses + 0.2 * losses.exo_pair(lp, beta=BETA).losses,
    )
    out = combo(lp, beta=BETA, label_smoothing=0.1)
    close(out.losses, 0.8 * losses.sigmoid(lp, beta=BETA, label_smoothing=0.1).losses
          + 0.2 * losses.exo_pair(lp, beta=BETA, label_smoothing=0.1).losses)  # fmt: skip
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        combo(lp, beta=BETA, simpo_gamma=1.0)
    assert losses.combine(["simpo", "sft"]).requires_reference is False
    assert losses.combine(["simpo", "sigmoid"]).requires_reference is True


# ---------------------------------------------------------------- gradients


def test_gradients_match_analytic_derivatives():
    c, r = jnp.array([0.7, -1.2]), jnp.array([-0.4, 0.9])
    sig = jax.nn.sigmoid
    m = c - r

    def grads(fn, **hp):
        return jax.grad(lambda c, r: fn(pairs(c, r), beta=BETA, **hp).losses.sum(), (0, 1))(c, r)

    gc, gr = grads(losses.sigmoid)
    close(gc, -BETA * sig(-BETA * m))
    close(gr, BETA * sig(-BETA * m))
    eps = 0.1
    gc, _ = grads(losses.sigmoid, label_smoothing=eps)
    close(gc, -BETA * ((1 - eps) * sig(-BETA * m) - eps * sig(BETA * m)))
    gc, gr = grads(losses.ipo, length_normalized=False)
    close(gc, 2 * (m - 1 / (2 * BETA)))
    close(gr, -2 * (m - 1 / (2 * BETA)))
    gc, _ = grads(losses.hinge)
    close(gc, -BETA * (1 - BETA * m > 0))
    gc, gr = grads(losses.nca_pair)
    close(gc, -BETA * sig(-BETA * c) + 0.5 * BETA * sig(BETA * c))
    close(gr, 0.5 * BETA * sig(BETA * r))
    gc, _ = grads(losses.apo_zero)
    close(gc, -BETA * sig(BETA * c) * sig(-BETA * c))
    # Rewards never carry gradient.
    g = jax.grad(lambda c: losses.sigmoid(pairs(c, r), beta=BETA).chosen_rewards.sum())(c)
    close(g, 0.0)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", sorted(set(losses.names()) - set(TOKEN_LEVEL)))
@pytest.mark.parametrize("margin", [-5e3, 5e3])
def test_finite_losses_and_gradients_at_huge_margins(name, margin):
    fn = losses.get(name)

    def total(c):
        lp = pairs(c, -c, chosen=-2e3, rejected=-8e3, lengths=(50.0, 60.0))
        return fn(lp, beta=1.0).losses.sum()

    c = jnp.full((2,), margin / 2, jnp.float32)
    value, grad = jax.value_and_grad(total)(c)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), (name, value, grad)


@pytest.mark.parametrize("f_divergence_type", losses.F_DIVERGENCES)
def test_f_divergences_finite_at_huge_log_ratios(f_divergence_type):
    fn = losses.build("sigmoid", f_divergence_type=f_divergence_type, f_alpha_divergence_coef=0.3)
    for margin in (-1e4, 1e4):
        total = lambda c: fn(pairs(c, -c), beta=1.0).losses.sum()
        value, grad = jax.value_and_grad(total)(jnp.full((2,), margin / 2))
        assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_float32_math_for_bf16_inputs_and_jit():
    lp = pairs([1.0, -0.5], [0.3, 2.0])
    bf16 = losses.PreferenceLogps(*(None if x is None else x.astype(jnp.bfloat16) for x in lp))
    out = jax.jit(lambda lp: losses.get("sigmoid")(lp, beta=BETA))(bf16)
    assert out.losses.dtype == jnp.float32 and out.chosen_rewards.dtype == jnp.float32
    rounded = [None if x is None else x.astype(jnp.bfloat16).astype(jnp.float32) for x in lp]
    expected = losses.get("sigmoid")(losses.PreferenceLogps(*rounded), beta=BETA)
    close(out.losses, expected.losses)
    # beta may be traced (e.g. a swept hyperparameter inside jit)
    traced = jax.jit(lambda b: losses.ipo(lp, beta=b).losses)(jnp.float32(BETA))
    close(traced, losses.ipo(lp, beta=BETA).losses)
