"""Prompt sharing (layout "packed_shared"): one row holds a pair's prompt once and both
responses; exactly the unshared computation.

- the mask rule of `dpo_jax.models.attention` on hand-made arrays, "xla" and "dot_product";
- the layout (hypothesis): every real token appears once per branch with its unshared
  position and loss mask, and pairs never straddle rows;
- per-pair log-probs, the DPO loss and its gradients of shared batches equal those of
  padded batches (float32, 1e-5), policy and reference, frozen-params and cached reference,
  every model family (Mistral's window and GPT-2's learned positions included);
- a few training steps on shared batches equal the same steps on packed batches, and a
  whole run with the switch reproduces the cached reference sums at its first step;
- the config switch, its refusals, and the FLOP count with the prompt counted once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loop import load_config, read_metrics
from test_validate import _problems, _tiny

from dpo_jax.data import batching, pipeline, shared_prompts
from dpo_jax.data.examples import TokenizedPair
from dpo_jax.models import DecoderLM, ModelConfig, attention
from dpo_jax.train import inputs, loop, throughput
from dpo_jax.train.optimizers import make_optimizer
from dpo_jax.train.scoring import Scoring, pair_logps
from dpo_jax.train.state import state_from_params
from dpo_jax.train.steps import Objective, make_dpo_step, preference_grads
from dpo_jax.train.validate import validate

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox"]


def size(pair) -> int:
    return shared_prompts.shared_size(
        len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    )


def random_pairs(n: int, seed: int, max_prompt: int = 9, max_response: int = 9):
    """n pairs of random lengths; pair 1 has a one-token prompt (nothing to share)."""
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(1, 256, int(rng.integers(lo, hi + 1))).tolist()

    pairs = [TokenizedPair(ids(1, max_prompt), ids(1, max_response), ids(1, max_response))]
    pairs += [TokenizedPair(ids(1, 1), ids(1, max_response), ids(1, max_response))]
    pairs += [
        TokenizedPair(ids(2, max_prompt), ids(1, max_response), ids(1, max_response))
        for _ in range(n - 2)
    ]
    return pairs


def shared(pairs, num_rows: int, row_length: int, ref_logps=None):
    """The shared batch of all `pairs` (the test asserts that every pair fits)."""
    plan = shared_prompts.plan_shared_packing(
        pairs, num_rows=num_rows, row_length=row_length, max_pairs=len(pairs)
    )
    assert plan.leftover == []
    return shared_prompts.shared_batch(
        pairs, plan, row_length=row_length, max_pairs=len(pairs), ref_logps=ref_logps
    )


def packed(pairs, num_rows: int, row_length: int, ref_logps=None):
    plan = batching.plan_packing(
        pairs, num_rows=num_rows, row_length=row_length, max_pairs=len(pairs)
    )
    assert plan.leftover == []
    return batching.packed_batch(
        pairs, plan, row_length=row_length, max_pairs=len(pairs), ref_logps=ref_logps
    )


# ------------------------------------------------------------------------------------------
# The mask rule
# ------------------------------------------------------------------------------------------


def rule(seg, prefix, pos, window):
    """The mask rule, one (query, key) at a time: [B, L, L] bool."""
    B, L = seg.shape
    out = np.zeros((B, L, L), bool)
    for b in range(B):
        for q in range(L):
            for k in range(q + 1):
                own = seg[b, k] == seg[b, q]
                named = prefix[b, q] != 0 and seg[b, k] == prefix[b, q]
                near = window is None or pos[b, q] - pos[b, k] < window
                out[b, q, k] = seg[b, k] != 0 and (own or named) and near
    return out


def test_mask_rule_on_hand_made_arrays():
    # Row 0: a prompt (segment 1) and two branches naming it, then padding. Row 1: a branch
    # without prefix, then a shared pair (segments 2-4), and a final token of segment 5
    # naming segment 4 (a prefix that is itself a branch: the rule does not care).
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 0], [1, 1, 2, 2, 3, 4, 4, 5]], np.int32)
    prefix = np.array([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 2, 2, 2, 4]], np.int32)
    pos = np.array([[0, 1, 2, 3, 4, 3, 4, 0], [0, 1, 0, 1, 2, 2, 3, 4]], np.int32)
    for window in (None, 3):
        got = np.asarray(attention.attention_mask(pos, seg, window, prefix))[:, 0, 0]
        np.testing.assert_array_equal(got, rule(seg, prefix, pos, window))
    full = np.asarray(attention.attention_mask(pos, seg, None, prefix))[0, 0, 0]
    assert full[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # rejected sees the prompt, not chosen
    assert not full[7].any()  # padding sees nothing
    # Without a prefix the rule is today's: the same segment only.
    np.testing.assert_array_equal(
        np.asarray(attention.attention_mask(pos, seg, 3)),
        np.asarray(attention.attention_mask(pos, seg, 3, np.zeros_like(prefix))),
    )

    # "dot_product" applies the same rule: equal outputs at every real token.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 8, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 8)), jnp.float32) for _ in range(2))
    for window in (None, 3):
        want = attention.xla_attention(q, k, v, seg, pos, window, prefix_segment_ids=prefix)
        got = attention.dot_product_attention(q, k, v, seg, pos, window, prefix)
        real = seg != 0
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-6)
    with pytest.raises(ValueError, match="config.model.attention"):
        attention.splash_attention(q, k, v, seg, pos, prefix_segment_ids=prefix)


# ------------------------------------------------------------------------------------------
# The layout
# ------------------------------------------------------------------------------------------

ids_st = st.lists(st.integers(1, 50), min_size=1, max_size=7)
pair_st = st.builds(TokenizedPair, prompt_ids=ids_st, chosen_ids=ids_st, rejected_ids=ids_st)


@settings(max_examples=60, deadline=None)
@given(st.lists(pair_st, min_size=1, max_size=10), st.integers(1, 4), st.integers(0, 12))
def test_layout_holds_each_sequence_with_its_positions_and_mask(pairs, num_rows, slack):
    row_length = max(size(p) for p in pairs) + slack
    plan = shared_prompts.plan_shared_packing(
        pairs, num_rows=num_rows, row_length=row_length, max_pairs=6
    )
    assert plan.packed and plan.packed[0] == 0  # pairs[0] always goes first
    assert sorted(plan.packed + plan.leftover) == list(range(len(pairs)))
    batch = shared_prompts.shared_batch(pairs, plan, row_length=row_length, max_pairs=6)
    batching.check_preference_batch(batch)
    assert batch["pair_mask"].tolist() == [int(b < len(plan.packed)) for b in range(6)]
    seg, prefix = batch["segment_ids"], batch["prefix_segment_ids"]
    for slot, i in enumerate(plan.packed):
        pair = pairs[i]
        rows = {r for side in (0, 1) for r in np.nonzero(batch["slot_ids"] == 2 * slot + side)[0]}
        assert len(rows) == 1  # never straddles rows
        (r,) = rows
        for side, response in enumerate((pair.chosen_ids, pair.rejected_ids)):
            branch = np.flatnonzero(batch["slot_ids"][r] == 2 * slot + side)
            (branch_seg,) = set(seg[r, branch])
            (named,) = set(prefix[r, branch])
            # What the branch reads: the prefix segment's tokens, then its own.
            context = np.concatenate([np.flatnonzero(seg[r] == named) if named else [], branch])
            context = context.astype(int)
            want = list(pair.prompt_ids) + list(response)
            assert batch["tokens"][r, context].tolist() == want
            assert batch["positions"][r, context].tolist() == list(range(len(want)))
            mask = [0] * len(pair.prompt_ids) + [1] * len(response)
            assert batch["loss_mask"][r, context].tolist() == mask
            assert branch_seg != 0 and (named == 0) == (len(pair.prompt_ids) == 1)
            # The prompt part is held once: no slot, never scored.
            if named:
                prompt_part = np.flatnonzero(seg[r] == named)
                assert (batch["slot_ids"][r, prompt_part] == -1).all()
                assert prompt_part.max() < branch.min()
    # Every real token belongs to a packed pair's prompt or branch; nothing else is scored.
    assert int(batch["loss_mask"].sum()) == sum(
        len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids) for i in plan.packed
    )
    assert np.count_nonzero(seg) == sum(size(pairs[i]) for i in plan.packed)


def test_layout_errors_name_the_pair():
    pairs = [TokenizedPair([1, 2], [3], [4]), TokenizedPair([1, 2, 3], [4, 5, 6], [7, 8])]
    with pytest.raises(ValueError, match="pair 1: 3 prompt \\+ 1 \\+ 3 chosen \\+ 2 rejected"):
        shared_prompts.plan_shared_packing(pairs, num_rows=2, row_length=8, max_pairs=2)
    with pytest.raises(ValueError, match="prefix_segment_ids.*packed"):
        padded = batching.pad_pairs(pairs, max_length=8)
        batching.check_preference_batch({**padded, "prefix_segment_ids": padded["tokens"]})


# ------------------------------------------------------------------------------------------
# Exact against the unshared computation, every family
# ------------------------------------------------------------------------------------------


def perturbed(params, seed):
    """A different model to serve as the reference (so that the loss is not trivial)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [0.02 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise, strict=True)])


def grads_of(model, params, reference, batch, objective):
    fn = functools.partial(
        preference_grads,
        scoring=Scoring(model),
        objective=objective,
        accum_steps=1,
        axis_name=None,
    )
    grads, loss, _ = jax.jit(fn)(params, reference, batch, jax.random.key(0))
    return loss, grads


def assert_trees_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


# One case adds a scanned stack, the "dot_product" kernel and a window of 4 (Mistral).
CASES = [(f, {}) for f in FAMILIES] + [
    ("mistral", {"sliding_window": 4, "attention": "dot_product", "scan_layers": True}),
]


@pytest.mark.parametrize("family, overrides", CASES, ids=[f"{f}{o}" for f, o in CASES])
def test_shared_equals_unshared(family, overrides):
    """The DPO loss and its gradients, the reference as frozen params (its forward on the
    same layout), and for Llama also the cached reference and the per-pair sums."""
    config = ModelConfig.tiny(family, **overrides)
    model = DecoderLM(config)
    pairs = random_pairs(5, seed=len(family))
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    padded = batching.pad_pairs(pairs, max_length=longest)
    params = model.init(jax.random.key(1), padded["tokens"][:1, 0])["params"]
    reference = perturbed(params, 2)
    sharing = shared(pairs, num_rows=3, row_length=2 * longest + 4)
    if family == "mistral":  # the window bites: some sequences are longer than it
        assert longest > config.sliding_window

    objective = Objective.create("sigmoid", beta=0.1)
    want = grads_of(model, params, reference, padded, objective)
    got = grads_of(model, params, reference, sharing, objective)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert_trees_close(got[1], want[1])
    if family != "llama":
        return
    # Per-pair sums (what a cached reference stores), then the cached reference's step.
    score = jax.jit(functools.partial(pair_logps, model=model))
    ref_logps = np.asarray(score(reference, padded))
    np.testing.assert_allclose(score(reference, sharing), ref_logps, rtol=1e-5)
    padded_cached = {**padded, "ref_logps": ref_logps}
    sharing_cached = shared(pairs, 3, 2 * longest + 4, ref_logps=ref_logps)
    want_cached = grads_of(model, params, None, padded_cached, objective)
    got_cached = grads_of(model, params, None, sharing_cached, objective)
    np.testing.assert_allclose(got_cached[0], want_cached[0], rtol=1e-5)
    np.testing.assert_allclose(got_cached[0], want[0], rtol=1e-5)
    assert_trees_close(got_cached[1], want_cached[1])


# ------------------------------------------------------------------------------------------
# Training steps, the config switch and the FLOP count
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_mode", ["params"])  # cached: test_shared_equals_unshared
def test_training_steps_on_shared_batches_equal_packed_ones(reference_mode):
    """Three optimizer steps (micro-batched over rows) on the same pairs per step: shared
    batches and packed ones end at the same params with the same losses."""
    config = ModelConfig.tiny("mistral", sliding_window=6)
    model = DecoderLM(config)
    pairs = random_pairs(12, seed=3)
    params = model.init(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
    tx = make_optimizer({"name": "adamw", "learning_rate": 1e-3, "max_grad_norm": 1.0})
    step = jax.jit(
        make_dpo_step(model=model, tx=tx, objective=Objective.create("sigmoid", 0.1), accum_steps=2)
    )
    reference = perturbed(params, 5)
    ref_logps = None
    if reference_mode == "cached":
        padded = batching.pad_pairs(pairs, max_length=18)
        ref_logps = np.asarray(pair_logps(reference, padded, model=model))
        reference = None
    results = {}
    for name, build in (("packed", packed), ("shared", shared)):
        state = state_from_params(params, tx, jax.random.key(0))
        losses = []
        for group in range(3):
            chunk = slice(4 * group, 4 * group + 4)
            ref = None if ref_logps is None else ref_logps[chunk]
            rows, length = (8, 18) if name == "packed" else (4, 36)
            batch = build(pairs[chunk], rows, length, ref_logps=ref)
            state, metrics = step(state, batch, reference)
            losses.append(float(metrics["loss"]))
        results[name] = (losses, state.params)
    np.testing.assert_allclose(results["shared"][0], results["packed"][0], rtol=1e-5)
    assert_trees_close(results["shared"][1], results["packed"][1])


def test_pipeline_and_config_switch():
    pairs = random_pairs(9, seed=4)
    spec = pipeline.IteratorSpec(
        batch_size=4, max_length=18, shuffle=False, shard_index=0, shard_count=1,
        layout="packed_shared",
    )  # fmt: skip
    ref_logps = np.arange(18, dtype=np.float32).reshape(9, 2) - 100
    batches = list(pipeline.make_preference_iterator(pairs, spec, ref_logps=ref_logps))
    # Rows of 2 * max_length, ceil(B / 2) of them; every pair once, with its cached sums.
    assert all(b["tokens"].shape == (2, 36) for b in batches)
    seen = sorted(tuple(r) for b in batches for r in b["ref_logps"][b["pair_mask"] == 1])
    assert seen == sorted(map(tuple, ref_logps))

    assert validate(_tiny(**{"data.layout": "packed_shared"})) is None
    message = _problems(_tiny(**{"data.layout": "packed_shared", "model.attention": "splash"}))
    assert "config.data.layout='packed_shared'" in message and "splash" in message
    message = _problems(_tiny(**{"data.layout": "packed_shared", "parallel.mode": "pmap"}))
    assert "needs config.parallel.mode='jit'" in message
    # Rows: ceil(B / 2), rounded up to what splits them (8 fake devices here).
    assert inputs.shared_rows(_tiny(), 8) == 8 and inputs.shared_rows(_tiny(), 40) == 24
    one_device = _tiny(**{"parallel.mesh_shape": (1, 1, -1), "dpo.accum_steps": 3})
    assert inputs.shared_rows(one_device, 10) == 6 and inputs.shared_rows(one_device, 1) == 3
    message = _problems(_tiny(**{"data.layout": "packed_shared", "dpo.loss.name": "unlikelihood"}))
    assert "needs per-token log-probs, which only the padded layout gives" in message


def test_flops_count_the_prompt_once():
    config = ModelConfig.tiny("llama")
    pairs = random_pairs(4, seed=5)
    batch = shared(pairs, num_rows=2, row_length=40)
    want = 0.0
    for p in pairs:
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        want += throughput.train_flops(config, [P + C, P + R])  # each branch, full context
        if P > 1:  # the shared prompt[:-1], computed once
            want -= throughput.train_flops(config, [P - 1])
        assert want > 0
    got = throughput.step_flops(config, batch, stage="dpo", reference_forward=True)
    assert got == pytest.approx(want * 4 / 3, rel=1e-12)
    # Fewer than the unshared count, by the prompt's share.
    unshared = throughput.step_flops(config, packed(pairs, 8, 20), stage="dpo",
                                     reference_forward=True)  # fmt: skip
    assert got < unshared


@pytest.mark.slow
def test_training_run_with_the_switch(tmp_path):
    """The whole run (pipeline, 8 fake devices, cached reference scored on padded batches,
    padded held-out evaluation) with config.data.layout='packed_shared': at the first step
    the policy is the reference, so the shared forward must reproduce the cached sums
    exactly: loss log 2 and zero rewards."""
    config = load_config("dpo")
    with config.unlocked():
        config.data.layout = "packed_shared"
        config.dpo.reference = "cached"
        config.dpo.steps = 2
    loop.run(config, str(tmp_path))
    train = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert train[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert train[0]["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert train[1]["loss"] != pytest.approx(np.log(2), abs=1e-6)  # it trains
