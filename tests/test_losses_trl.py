"""Parity of dpo_jax.losses with TRL 1.16's own loss code, run on torch float64 tensors.

TRL 1.16 has no standalone `dpo_loss`: the formulas live inside `DPOTrainer._compute_loss`, so
we call that method on a trainer built with `object.__new__` (no model, no dataset) whose
attributes are just the ones the method reads, and whose "model" is a stub returning the
per-token log-probs we chose. The same for `KTOTrainer._compute_loss`; CPO and ORPO have
standalone `cpo_loss` / `odds_ratio_loss` methods. Inputs are drawn in float32 so both sides
see identical values; TRL computes in float64, we in float32.
"""

from collections import defaultdict
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
from trl import DPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

B, L = 5, 12
RTOL, ATOL = 1e-6, 1e-7


class StubModel:
    """Stands in for a causal LM with TRL's fused LM head: returns fixed per-token outputs."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, outputs, kl_outputs=None, kl_input_ids=None):
        self.outputs, self.kl_outputs, self.kl_input_ids = outputs, kl_outputs, kl_input_ids

    def __call__(self, input_ids=None, **kwargs):
        if self.kl_input_ids is not None and input_ids is self.kl_input_ids:
            return self.kl_outputs
        return self.outputs


def fused_outputs(token_logps, log_sum_sq_probs=None):
    zeros = torch.zeros_like(token_logps)
    return SimpleNamespace(
        log_probs=token_logps,
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
        log_sum_sq_probs=log_sum_sq_probs,
        aux_loss=None,
    )


ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
)


def make_pairs(seed, scale=1.0):
    """Per-token arrays `[B, L]` in float32 with ragged response masks (>= 1 token each).

    Values are multiples of 2^-12, so their sums and log-ratio differences are exact in
    float32: the comparison then measures the loss math, not float32 rounding of the inputs.
    """
    rng = np.random.default_rng(seed)
    grid = lambda x: (np.round(x * 4096) / 4096).astype(np.float32)
    tok = lambda: grid(-rng.exponential(scale, size=(B, L)))
    lengths = rng.integers(1, L + 1, size=(2, B))
    masks = (np.arange(L)[None, None, :] >= L - lengths[:, :, None]).astype(np.float32)
    lss = grid(-rng.exponential(1.0, size=(2, B, L)))
    return dict(
        policy=(tok() * masks[0], tok() * masks[1]),
        ref=(tok() * masks[0], tok() * masks[1]),
        masks=(masks[0], masks[1]),
        lss=(lss[0], lss[1]),
    )


def ours_logps(d, idx=slice(None)):
    (pc, pr), (rc, rr), (mc, mr) = d["policy"], d["ref"], d["masks"]
    f = lambda x: jnp.asarray(x[idx])
    return losses.PreferenceLogps(
        chosen_logps=f(pc.sum(-1)),
        rejected_logps=f(pr.sum(-1)),
        ref_chosen_logps=f(rc.sum(-1)),
        ref_rejected_logps=f(rr.sum(-1)),
        chosen_lengths=f(mc.sum(-1)),
        rejected_lengths=f(mr.sum(-1)),
        chosen_token_logps=f(pc),
        rejected_token_logps=f(pr),
        ref_chosen_token_logps=f(rc),
        ref_rejected_token_logps=f(rr),
        chosen_loss_mask=f(mc),
        rejected_loss_mask=f(mr),
        chosen_log_sum_sq_probs=f(d["lss"][0]),
        rejected_log_sum_sq_probs=f(d["lss"][1]),
    )


def trl_dpo(d, idx, *, loss_type, beta, loss_weights=None, dtype=torch.float64, **options):
    """TRL's DPO loss (a scalar: the batch mean) and mean rewards on the pairs `idx`."""
    t64 = lambda x: torch.tensor(np.asarray(x)[idx], dtype=dtype)
    (pc, pr), (rc, rr), (mc, mr) = d["policy"], d["ref"], d["masks"]
    n = t64(pc).shape[0]
    completion_mask = torch.zeros(2 * n, L + 1, dtype=torch.long)
    completion_mask[:, 1:] = torch.cat([t64(mc), t64(mr)]).long()
    lss = torch.cat([t64(d["lss"][0]), t64(d["lss"][1])])
    policy = StubModel(fused_outputs(torch.cat([t64(pc), t64(pr)]), lss))
    reference = StubModel(fused_outputs(torch.cat([t64(rc), t64(rr)])))
    trainer = object.__new__(DPOTrainer)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    fields = dict(
        beta=beta,
        loss_types=types,
        loss_weights=loss_weights or [1.0] * len(types),
        ld_alpha=options.pop("ld_alpha", None),
        f_divergence_type=options.pop("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=options.pop("f_alpha_divergence_coef", 0.5),
        label_smoothing=options.pop("label_smoothing", 0.0),
        use_weighting=options.pop("use_weighting", False),
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        ref_model=reference,
        model=policy,
        accelerator=ACCELERATOR,
        args=SimpleNamespace(
            discopop_tau=options.pop("discopop_tau", 0.05), gradient_checkpointing_kwargs=None
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    assert not options, options
    trainer.__dict__.update(fields)
    inputs = {
        "input_ids": torch.zeros(2 * n, L + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, L + 1, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    with torch.no_grad():
        loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return float(loss), metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


# (loss_type, our hparams, TRL options); every per-pair DPOTrainer loss_type of TRL 1.16.
DPO_CASES = [
    ("sigmoid", {}, {}),
    ("hinge", {}, {}),
    ("ipo", {}, {}),
    ("exo_pair", {"label_smoothing": 0.01}, {"label_smoothing": 0.01}),
    ("nca_pair", {}, {}),
    ("robust", {"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
    ("bco_pair", {}, {}),
    ("sppo_hard", {}, {}),
    ("apo_zero", {}, {}),
    ("apo_down", {}, {}),
    ("discopop", {"discopop_tau": 0.3}, {"discopop_tau": 0.3}),
    ("sft", {}, {}),
    ("sigmoid_norm", {}, {}),
]


def assert_close(ours, theirs, what):
    np.testing.assert_allclose(np.float64(ours), theirs, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type,hparams,options", DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_dpo_losses_match_trl_per_pair(loss_type, hparams, options, beta):
    d = make_pairs(seed=hash(loss_type) % 1000)
    out = losses.get(loss_type)(ours_logps(d), beta=beta, **hparams)
    for i in range(B):
        idx = slice(i, i + 1)  # one pair per TRL call: TRL only returns the batch mean
        loss, chosen_reward, rejected_reward = trl_dpo(
            d, idx, loss_type=loss_type, beta=beta, **options
        )
        assert_close(out.losses[i], loss, f"{loss_type} loss, pair {i}")
        assert_close(out.chosen_rewards[i], chosen_reward, f"{loss_type} chosen reward")
        assert_close(out.rejected_rewards[i], rejected_reward, f"{loss_type} rejected reward")


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_aot_matches_trl_batch_mean(loss_type, label_smoothing):
    d = make_pairs(seed=7)
    out = losses.get(loss_type)(ours_logps(d), beta=0.5, label_smoothing=label_smoothing)
    loss, *_ = trl_dpo(
        d, slice(None), loss_type=loss_type, beta=0.5, label_smoothing=label_smoothing
    )
    assert_close(jnp.mean(out.losses), loss, loss_type)


@pytest.mark.parametrize(
    "f_divergence_type,coef",
    [
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.3),
        ("alpha_divergence", 1.0),
    ],
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop"])
def test_f_divergences_match_trl(loss_type, f_divergence_type, coef):
    d = make_pairs(seed=3, scale=0.05)  # small log-ratios: forward KL's exp(-ratio) stays moderate
    fn = losses.build(loss_type, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)
    out = fn(ours_logps(d), beta=0.7)
    for i in range(B):
        loss, *_ = trl_dpo(
            d,
            slice(i, i + 1),
            loss_type=loss_type,
            beta=0.7,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=coef,
            # TRL's alpha-divergence only knows float16/bfloat16/float32 (its exp clamp table)
            dtype=torch.float32 if f_divergence_type == "alpha_divergence" else torch.float64,
        )
        assert_close(out.losses[i], loss, f"{loss_type} {f_divergence_type} pair {i}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "apo_zero"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_matches_trl(loss_type, ld_alpha):
    d = make_pairs(seed=11)
    out = losses.build(loss_type, ld_alpha=ld_alpha)(ours_logps(d), beta=0.2)
    for i in range(B):
        loss, chosen_reward, _ = trl_dpo(
            d, slice(i, i + 1), loss_type=loss_type, beta=0.2, ld_alpha=ld_alpha
        )
        assert_close(out.losses[i], loss, f"LD {loss_type} pair {i}")
        assert_close(out.chosen_rewards[i], chosen_reward, f"LD {loss_type} reward {i}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "nca_pair", "sppo_hard"])
def test_wpo_weighting_matches_trl(loss_type):
    d = make_pairs(seed=5, scale=0.3)
    out = losses.build(loss_type, use_weighting=True)(ours_logps(d), beta=0.3)
    for i in range(B):
        loss, *_ = trl_dpo(d, slice(i, i + 1), loss_type=loss_type, beta=0.3, use_weighting=True)
        assert_close(out.losses[i], loss, f"WPO {loss_type} pair {i}")


def test_weighted_combination_matches_trl():
    d = make_pairs(seed=13)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    out = losses.build(types, weights)(ours_logps(d), beta=0.1)
    for i in range(B):
        loss, *_ = trl_dpo(d, slice(i, i + 1), loss_type=types, loss_weights=weights, beta=0.1)
        assert_close(out.losses[i], loss, f"MPO pair {i}")
    combined = losses.combine([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])
    np.testing.assert_array_equal(combined(ours_logps(d), beta=0.1).losses, out.losses)


def test_ld_and_wpo_and_f_divergence_together_match_trl():
    d = make_pairs(seed=17, scale=0.1)
    fn = losses.build(
        ["sigmoid", "hinge"],
        [1.0, 0.5],
        f_divergence_type="js_divergence",
        use_weighting=True,
        ld_alpha=0.4,
    )
    out = fn(ours_logps(d), beta=0.5)
    for i in range(B):
        loss, *_ = trl_dpo(
            d,
            slice(i, i + 1),
            loss_type=["sigmoid", "hinge"],
            loss_weights=[1.0, 0.5],
            beta=0.5,
            f_divergence_type="js_divergence",
            use_weighting=True,
            ld_alpha=0.4,
        )
        assert_close(out.losses[i], loss, f"all modifiers pair {i}")


# ---------------------------------------------------------------- KTO (TRL KTOTrainer)


def trl_kto(logps, ref_logps, label, kl_logps, ref_kl_logps, *, loss_type, beta, dw, uw):
    """TRL's KTO loss for one example (scalar), via `KTOTrainer._compute_loss` on stubs."""
    t64 = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
    n_kl = len(kl_logps)
    outputs = fused_outputs(t64([[float(logps)]]))
    kl_input_ids = torch.zeros(n_kl, 2, dtype=torch.long)
    kl_outputs = fused_outputs(t64(np.asarray(kl_logps)[:, None]))
    policy = StubModel(outputs, kl_outputs, kl_input_ids)
    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        loss_type=loss_type,
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        model=policy,
        accelerator=ACCELERATOR,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    batch = {
        "input_ids": torch.zeros(1, 2, dtype=torch.long),
        "attention_mask": torch.ones(1, 2, dtype=torch.long),
        "completion_mask": torch.ones(1, 2, dtype=torch.long),
        "label": torch.tensor([bool(label)]),
        "ref_logps": t64([float(ref_logps)]),
    }
    if loss_type == "kto":
        batch.update(
            KL_input_ids=kl_input_ids,
            KL_attention_mask=torch.ones(n_kl, 2, dtype=torch.long),
            KL_completion_mask=torch.ones(n_kl, 2, dtype=torch.long),
            ref_KL_logps=t64(ref_kl_logps),
        )
    with torch.no_grad():
        loss = trainer._compute_loss(policy, batch, return_outputs=False)
    return float(loss)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [-3.0, 2.0])  # a negative KL estimate is clamped to 0
def test_kto_matches_trl(loss_type, kl_shift):
    rng = np.random.default_rng(0)
    n = 6
    logps = (-rng.exponential(5.0, n)).astype(np.float32)
    ref_logps = (logps + rng.normal(0, 2.0, n)).astype(np.float32)
    labels = np.array([1, 0, 1, 1, 0, 0], bool)
    kl_logps = (-rng.exponential(5.0, 4)).astype(np.float32)
    ref_kl_logps = (kl_logps - kl_shift + rng.normal(0, 0.1, 4)).astype(np.float32)
    kl = losses.kto_kl_estimate(jnp.asarray(kl_logps), jnp.asarray(ref_kl_logps))
    lp = losses.UnpairedLogps(jnp.asarray(logps), jnp.asarray(ref_logps), jnp.asarray(labels), kl)
    hp = dict(desirable_weight=1.3, undesirable_weight=0.7)
    out = losses.get(loss_type)(lp, beta=0.4, **hp)
    for i in range(n):
        theirs = trl_kto(
            logps[i], ref_logps[i], labels[i], kl_logps, ref_kl_logps,
            loss_type=loss_type, beta=0.4, dw=1.3, uw=0.7,
        )  # fmt: skip
        assert_close(out.losses[i], theirs, f"{loss_type} example {i}")
    assert_close(out.rewards, 0.4 * (logps.astype(np.float64) - ref_logps), "rewards")


# ---------------------------------------------------------------- CPO / SimPO / ORPO


def trainer_stub(cls, **fields):
    trainer = object.__new__(cls)
    trainer.__dict__.update(accelerator=ACCELERATOR, **fields)
    return trainer


def policy_only(d, average):
    """Policy log-prob sums (or per-token averages, as TRL's `average_log_prob`), float64."""
    (pc, pr), (mc, mr) = d["policy"], d["masks"]
    sums = [x.astype(np.float64).sum(-1) for x in (pc, pr)]
    if average:
        sums = [s / m.sum(-1) for s, m in zip(sums, (mc, mr), strict=True)]
    return [torch.tensor(s) for s in sums]


def trl_chosen_nll(d):
    """TRL's CPO/ORPO NLL: `nn.CrossEntropyLoss()` mean over chosen tokens. Needs logits, so
    it is reproduced from the source: for one pair it is -sum(chosen token logps) / |y_w|."""
    (pc, _), (mc, _) = d["policy"], d["masks"]
    return -pc.astype(np.float64).sum(-1) / mc.sum(-1)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_cpo_matches_trl(label_smoothing, cpo_alpha):
    d = make_pairs(seed=21)
    trainer = trainer_stub(
        CPOTrainer, alpha=0.0, beta=0.3, label_smoothing=label_smoothing, loss_type="sigmoid"
    )
    their_losses, their_c, their_r = trainer.cpo_loss(*policy_only(d, average=False))
    their_losses = their_losses.numpy() + cpo_alpha * trl_chosen_nll(d)
    out = losses.get("cpo")(
        ours_logps(d), beta=0.3, cpo_alpha=cpo_alpha, label_smoothing=label_smoothing
    )
    assert_close(out.losses, their_losses, "cpo")
    assert_close(out.chosen_rewards, their_c.numpy(), "cpo chosen reward")
    assert_close(out.rejected_rewards, their_r.numpy(), "cpo rejected reward")
    # Without a reference the loss still runs.
    assert losses.get("cpo")(ours_logps(d)._replace(ref_chosen_logps=None), beta=0.3)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl(label_smoothing):
    d = make_pairs(seed=23)
    trainer = trainer_stub(
        CPOTrainer,
        alpha=0.0,
        beta=2.0,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        simpo_gamma=0.8,
    )
    their_losses, their_c, _ = trainer.cpo_loss(*policy_only(d, average=True))
    lp = ours_logps(d)._replace(ref_chosen_logps=None, ref_rejected_logps=None)
    out = losses.get("simpo")(lp, beta=2.0, simpo_gamma=0.8, label_smoothing=label_smoothing)
    assert_close(out.losses, their_losses.numpy(), "simpo")
    assert_close(out.chosen_rewards, their_c.numpy(), "simpo reward")


def test_orpo_matches_trl():
    d = make_pairs(seed=29, scale=0.4)
    trainer = trainer_stub(ORPOTrainer, beta=0.25)
    their_losses, their_c, their_r, *_ = trainer.odds_ratio_loss(*policy_only(d, average=True))
    # ORPOTrainer: loss = policy_nll_loss - losses.mean(); per pair: nll - beta*log sigma(...)
    expected = trl_chosen_nll(d) - their_losses.numpy()
    lp = ours_logps(d)._replace(ref_chosen_logps=None, ref_rejected_logps=None)
    out = losses.get("orpo")(lp, beta=0.25)
    assert_close(out.losses, expected, "orpo")
    assert_close(out.chosen_rewards, their_c.numpy(), "orpo chosen reward")
    assert_close(out.rejected_rewards, their_r.numpy(), "orpo rejected reward")
