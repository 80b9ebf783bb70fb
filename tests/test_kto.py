"""KTO training step: loss, KL baseline, metrics and gradients against TRL 1.16's
`KTOTrainer._compute_loss` on the same log-probs; exact accumulation; batches.

TRL's trainer is built with `object.__new__` and a stub "model" returning the per-example
log-prob sums our tiny model gives (as in tests/test_losses_trl.py); torch autograd gives
TRL's gradient w.r.t. those sums, and the chain rule through our model's log-probs (a VJP)
gives the parameter gradient that our step must reproduce.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testlib import SGD, L, grads_of, random_params, sgd_state, tiny_model

from dpo_jax.data.batching import kl_pairs, pad_unpaired
from dpo_jax.data.examples import TokenizedUnpaired
from dpo_jax.train import unpaired
from dpo_jax.train.scoring import Scoring

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from trl import KTOTrainer  # noqa: E402

LABELS = [True, False, True, True, False, False]  # 6 real examples in 8 slots


def random_examples(n: int = len(LABELS), seed: int = 0) -> list[TokenizedUnpaired]:
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(3, 60, size=rng.integers(lo, hi)).tolist()
    return [TokenizedUnpaired([1, *ids(0, 4)], [*ids(1, 6), 2], LABELS[i % 6]) for i in range(n)]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    policy, reference = random_params(model, 1), random_params(model, 2)
    batch = pad_unpaired(random_examples(), max_length=L, batch_size=8)
    return model, policy, reference, batch


# ------------------------------------------------------------------------------- TRL side


class StubModel:
    """A causal LM with TRL's fused LM head that returns fixed per-example log-prob sums (one
    "token" each), for the examples or, when called on the KL inputs, the KL sequences."""

    training = True

    def __init__(self, logps, kl_logps, kl_input_ids):
        self.logps, self.kl_logps, self.kl_input_ids = logps, kl_logps, kl_input_ids

    def __call__(self, input_ids=None, **kwargs):
        x = self.kl_logps if input_ids is self.kl_input_ids else self.logps
        zeros = torch.zeros_like(x[:, None])
        return SimpleNamespace(
            log_probs=x[:, None], entropy=zeros, mean_logits=zeros, aux_loss=None
        )


def trl_kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, *, loss_type, beta, dw, uw):
    """(loss, d loss / d logps, metrics) of TRL's KTOTrainer on one batch, float64."""
    t64 = lambda x: torch.tensor(np.asarray(x, np.float64))
    logps = t64(logps).requires_grad_(True)
    n = len(labels)
    kl_input_ids = torch.zeros(n, 2, dtype=torch.long)
    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        loss_type=loss_type, beta=beta, desirable_weight=dw, undesirable_weight=uw,
        calculate_KL=loss_type == "kto", precompute_ref_logps=True, aux_loss_enabled=False,
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    ones = torch.ones(n, 2, dtype=torch.long)
    batch = {
        "input_ids": torch.zeros(n, 2, dtype=torch.long), "attention_mask": ones,
        "completion_mask": ones, "label": torch.tensor(labels), "ref_logps": t64(ref_logps),
        "KL_input_ids": kl_input_ids, "KL_attention_mask": ones, "KL_completion_mask": ones,
        "ref_KL_logps": t64(ref_kl_logps),
    }  # fmt: skip
    policy = StubModel(logps, t64(kl_logps), kl_input_ids)
    loss = trainer._compute_loss(policy, batch, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), logps.grad.numpy(), metrics


# ------------------------------------------------------------------------------- tests


def test_kl_sequences_rotate_completions_within_the_batch_as_trl():
    items = random_examples()
    pairs = kl_pairs(items, L)
    completions = [it.completion_ids for it in items]
    assert [p.rejected_ids for p in pairs] == [completions[-1]] + completions[:-1]
    assert [p.chosen_ids for p in pairs] == completions
    assert all(p.prompt_ids == it.prompt_ids for p, it in zip(pairs, items, strict=True))
    # A KL sequence that would overflow max_length keeps its start (TRL truncates the same way).
    long = [TokenizedUnpaired([1, 5, 6], [7, 2], True), TokenizedUnpaired([1], [8] * 6, False)]
    assert kl_pairs(long, 6)[0].rejected_ids == [8, 8, 8]


def sharpened(params, factor):
    """`params` with a `factor` times larger unembedding: a sharper next-token distribution,
    which gives random completions lower log-probs."""
    return {**params, "lm_head": params["lm_head"] * factor}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_sign", [1, -1])  # -1: a negative KL estimate, clamped to 0
def test_step_loss_kl_metrics_and_grads_match_trl(setup, loss_type, kl_sign):
    model, base, _, batch = setup
    policy, reference = (base, sharpened(base, 10.0))[::kl_sign]
    scoring = Scoring(model)
    n = len(LABELS)
    sides = [
        unpaired.sequence_logps(scoring, p, batch, s) for p in (policy, reference) for s in (0, 1)
    ]
    logps, kl_logps, ref_logps, ref_kl_logps = (np.asarray(x[:n], np.float32) for x in sides)
    assert np.sign(np.mean(kl_logps - ref_kl_logps)) == kl_sign
    objective = unpaired.UnpairedObjective.create(
        loss_type, 0.3, {"desirable_weight": 1.3, "undesirable_weight": 0.7}
    )
    step = jax.jit(unpaired.make_unpaired_step(model=model, tx=SGD, objective=objective))
    new_state, m = step(sgd_state(policy), batch, reference)
    loss, dlogps, theirs = trl_kto(
        logps, ref_logps, kl_logps, ref_kl_logps, LABELS, loss_type=loss_type,
        beta=0.3, dw=1.3, uw=0.7,
    )  # fmt: skip
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                "rewards/margins"):  # fmt: skip
        np.testing.assert_allclose(float(m[key]), theirs[key], rtol=1e-6, atol=1e-6, err_msg=key)
    if loss_type == "kto":
        np.testing.assert_allclose(float(m["kl"]), theirs["kl"], rtol=1e-6, atol=1e-7)
    # TRL's gradient w.r.t. the example log-probs, carried to the params by our model's VJP.
    ct = jnp.zeros(batch["pair_mask"].shape, jnp.float32).at[:n].set(dlogps.astype(np.float32))
    _, vjp = jax.vjp(lambda p: unpaired.sequence_logps(scoring, p, batch, 0), policy)
    expected = vjp(ct)[0]
    ours = grads_of(sgd_state(policy), new_state)
    for (path, g), e in zip(
        jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulation_gives_the_one_big_batch_step(setup, accum_steps):
    """Micro-batches of 4 or 2 (holding 4+2 or 2+2+2+0 real examples) give the gradient,
    loss, KL baseline and metrics of the whole batch: z_0 comes from all of it first."""
    model, policy, reference, batch = setup
    objective = unpaired.UnpairedObjective.create("kto", 0.5)
    results = []
    for a in (1, accum_steps):
        step = unpaired.make_unpaired_step(model=model, tx=SGD, objective=objective, accum_steps=a)
        new_state, metrics = jax.jit(step)(sgd_state(policy), batch, sharpened(reference, 5.0))
        results.append((grads_of(sgd_state(policy), new_state), metrics))
    (g1, m1), (ga, ma) = results
    assert float(m1["kl"]) > 0
    for key in m1:
        np.testing.assert_allclose(ma[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_eval_step_gives_the_train_step_metrics(setup):
    model, policy, reference, batch = setup
    objective = unpaired.UnpairedObjective.create("kto", 0.5)
    step = unpaired.make_unpaired_step(model=model, tx=SGD, objective=objective)
    _, train = jax.jit(step)(sgd_state(policy), batch, reference)
    evaluate = unpaired.make_unpaired_eval_step(model=model, objective=objective)
    held_out = jax.jit(evaluate)(policy, batch, reference)
    assert set(held_out) <= set(train)
    for key, value in held_out.items():
        np.testing.assert_allclose(value, train[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert float(held_out["count/chosen"]) == 3 and float(held_out["examples"]) == 6


def test_step_refuses_a_missing_reference_and_a_paired_batch(setup):
    model, policy, reference, batch = setup
    step = unpaired.make_unpaired_step(model=model, tx=SGD)
    with pytest.raises(ValueError, match="needs the frozen reference params"):
        step(sgd_state(policy), batch, None)
    paired = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="lacks field.*labels"):
        step(sgd_state(policy), paired, reference)
    with pytest.raises(ValueError, match="not unpaired"):
        unpaired.UnpairedObjective.create("sigmoid")


def test_lora_kto_starts_like_full_kto_and_trains_adapters_only(setup):
    """LoRA KTO: zero-initialised adapters give full KTO's first step (loss, KL baseline,
    rewards); the reference is the base (adapters off); only adapters get gradients."""
    from dpo_jax.models import lora

    model, policy, _, batch = setup
    config = lora.LoraConfig(rank=4, alpha=8.0)
    reference = sharpened(policy, 5.0)
    objective = unpaired.UnpairedObjective.create("kto", 0.5)
    full_step = unpaired.make_unpaired_step(model=model, tx=SGD, objective=objective)
    _, full = jax.jit(full_step)(sgd_state(reference), batch, reference)
    # The base is the reference here: full KTO from the base has policy = reference.
    adapters = lora.init_adapters(reference, config, jax.random.key(0))
    lora_step = unpaired.make_unpaired_step(model=model, tx=SGD, objective=objective, lora=config)
    new_state, ours = jax.jit(lora_step)(sgd_state(adapters), batch, reference)
    for key in ("loss", "kl", "rewards/chosen", "logps/rejected", "tokens"):
        np.testing.assert_allclose(ours[key], full[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert float(ours["grad_norm"]) > 0
    assert jax.tree.structure(new_state.params) == jax.tree.structure(adapters)
    evaluate = unpaired.make_unpaired_eval_step(model=model, objective=objective, lora=config)
    held_out = jax.jit(evaluate)(new_state.params, batch, reference)
    assert float(held_out["rewards/margins"]) != 0.0  # the adapters moved the policy
