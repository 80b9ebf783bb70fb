"""KTO end to end: a tiny run separates held-out desirable from undesirable completions, and
`configs/kto.py:tiny` trains through the main loop with TRL's metric names."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_loop import load_config, read_metrics
from train_testlib import L, random_params, tiny_model

from dpo_jax.data import pipeline
from dpo_jax.data.batching import pad_unpaired
from dpo_jax.data.examples import TokenizedUnpaired
from dpo_jax.train import loop, optimizers, state, toy, unpaired


def unpair(pairs) -> list[TokenizedUnpaired]:
    """Each marker pair as a desirable and an undesirable example (TRL's
    unpair_preference_dataset)."""
    out = []
    for p in pairs:
        out += [TokenizedUnpaired(p.prompt_ids, p.chosen_ids, True),
                TokenizedUnpaired(p.prompt_ids, p.rejected_ids, False)]  # fmt: skip
    return out


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
def test_a_tiny_kto_run_separates_held_out_desirable_from_undesirable(loss):
    """Marker pairs (`toy.marker_pairs`: the completions differ in their last token) split
    into unpaired examples; 30 steps of the real jitted step on batches of the real
    pipeline. Held out, desirable completions gain reward over undesirable ones."""
    model = tiny_model()
    params = random_params(model, 0)
    train, held_out = unpair(toy.marker_pairs(256, seed=0)), unpair(toy.marker_pairs(64, seed=1))
    spec = pipeline.IteratorSpec(batch_size=16, max_length=L, seed=0, num_epochs=None)
    batches = pipeline.make_unpaired_iterator(train, spec)
    tx = optimizers.make_optimizer({"name": "adamw", "learning_rate": 3e-3, "warmup_steps": 5})
    objective = unpaired.UnpairedObjective.create(loss, 0.1)
    step = jax.jit(unpaired.make_unpaired_step(model=model, tx=tx, objective=objective))
    evaluate = jax.jit(unpaired.make_unpaired_eval_step(model=model, objective=objective))
    eval_batch = pad_unpaired(held_out, max_length=L)
    before = evaluate(params, eval_batch, params)
    train_state = state.state_from_params(params, tx, jax.random.PRNGKey(0))
    for _ in range(30):
        train_state, metrics = step(train_state, next(batches), params)
        assert np.isfinite(float(metrics["loss"]))
    after = evaluate(train_state.params, eval_batch, params)
    assert float(before["rewards/margins"]) == 0.0 and float(before["loss"]) == pytest.approx(0.5)
    assert float(after["rewards/margins"]) > 0.1
    assert float(after["rewards/chosen"]) > 0 > float(after["rewards/rejected"])
    assert float(after["loss"]) < 0.5


TRL_METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "logps/chosen", "logps/rejected")  # fmt: skip


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("kto"))
    loop.run(load_config("kto"), workdir)
    return workdir


def test_kto_tiny_trains_through_the_main_loop(kto_run):
    records = read_metrics(kto_run)
    data = [r for r in records if r["stage"] == "data"][-1]
    # The synthetic preference pairs are split into desirable and undesirable examples.
    assert data["data/train_examples"] == 2 * 192 and data["data/eval_examples"] == 2 * 64
    train = [r for r in records if r["stage"] == "dpo" and "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    for r in train:
        assert all(np.isfinite(r[k]) for k in TRL_METRICS)
        assert r["count/chosen"] + r["count/rejected"] == 8 and r["nonfinite_steps_total"] == 0
    evals = [r for r in records if r["stage"] == "dpo" and "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    # At step 0 the policy is the reference: every reward and the KL baseline are 0, and the
    # KTO loss is sigma(0) = 0.5 per example.
    first = evals[0]
    assert first["eval/loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["eval/kl"] == 0.0 and first["eval/rewards/margins"] == 0.0
    assert first["eval/count/chosen"] == first["eval/count/rejected"] == 64
    last = evals[-1]
    assert last["eval/rewards/margins"] == pytest.approx(
        last["eval/rewards/chosen"] - last["eval/rewards/rejected"]
    )
    summary = loop.summarize(kto_run)
    assert "Held-out examples (128)" in summary and "KL baseline" in summary


def test_kto_pmap_mode_matches_jit_mode(kto_run, tmp_path):
    """The KL baseline and the loss are global-batch quantities in both modes (psum'ed over
    the 8 pmap replicas)."""
    config = load_config("kto")
    with config.unlocked():
        config.parallel.mode = "pmap"
    loop.run(config, str(tmp_path))
    ours = [r for r in read_metrics(str(tmp_path)) if r["stage"] == "dpo"]
    theirs = [r for r in read_metrics(kto_run) if r["stage"] == "dpo"]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        for key in [k for k in b if k.startswith(("eval/", *TRL_METRICS))]:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
