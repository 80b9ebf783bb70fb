"""benchmarks/dpo_throughput.py on a tiny workload, ours only (TRL's side needs minutes):
keeps the script from rotting between benchmark runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(ROOT, "benchmarks", "dpo_throughput.py")
    spec = importlib.util.spec_from_file_location("dpo_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    workload = bench.Workload(
        vocab=128, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2,
        prompt_lengths=(2, 6), response_lengths=(2, 8), pairs_per_step=2, max_length=14,
        pad_to_multiple_of=8, pack_rows=2, pack_row_length=16,
    )  # fmt: skip
    model_dir = str(tmp_path_factory.mktemp("bench") / "model")
    n_params = bench.save_model(workload, model_dir)
    return workload, model_dir, n_params, bench.sample_pairs(workload, 13)


def test_pairs_are_seeded_and_within_the_workload(bench, tiny):
    workload, _, n_params, pairs = tiny
    assert pairs == bench.sample_pairs(workload, 13)
    # Untied embedding and head 2 * 128 * 32; per layer q, o 32*32, k, v 32*16 (2 kv heads
    # of 8), gated MLP 3 * 32 * 64, two norms 2 * 32; final norm 32.
    assert n_params == 2 * 128 * 32 + 2 * (2 * 1024 + 2 * 512 + 3 * 32 * 64 + 64) + 32
    for prompt, chosen, rejected in pairs:
        assert 2 <= len(prompt) <= 6 and EOS not in prompt
        for response in (chosen, rejected):
            assert 2 <= len(response) <= 8 and response[-1] == EOS
            assert min(response[:-1], default=3) >= 3


EOS = 2


def test_ours_runs_both_layouts_and_counts_what_trl_would(bench, tiny):
    workload, model_dir, _, pairs = tiny
    steps = 3
    padded = bench.Ours(bench.System("ours", "padded", "params"), workload, model_dir, pairs, steps)
    # The padded batches hold consecutive pairs, exactly what TRL's sequential sampler feeds
    # it: the batch-side count (segment ids) equals the pair-side count (lengths).
    expected = bench.step_counts(model_dir, workload, pairs, steps, "params")
    for ours, trl in zip(padded.counts, expected, strict=True):
        assert (ours["pairs"], ours["tokens"]) == (trl["pairs"], trl["tokens"])
        assert ours["flops"] == pytest.approx(trl["flops"], rel=1e-12)
    packed = bench.Ours(bench.System("ours", "packed", "cached"), workload, model_dir, pairs, steps)
    shared = bench.Ours(
        bench.System("ours", "packed_shared", "params"), workload, model_dir, pairs, steps
    )
    for impl in (padded, packed, shared):
        out = impl.run(1, 2)
        assert len(out) == 2 and all(s["seconds"] > 0 and s["pairs"] >= 1 for s in out)
        assert all(s["tokens"] <= s["slots"] for s in out)
        assert impl.info()["compile_s"] > 0
    # Shared prompts: fewer tokens and FLOPs than the pairs' separate sequences.
    for count in shared.counts:
        assert count["tokens"] < count["pair_tokens"]
    assert sum(c["flops"] for c in shared.counts) / sum(c["pair_tokens"] for c in shared.counts) < (
        sum(c["flops"] for c in padded.counts) / sum(c["tokens"] for c in padded.counts)
    )
    # Cached reference: no reference forward in the step, so 3/4 of the FLOPs per token.
    cached = bench.step_counts(model_dir, workload, pairs, steps, "cached")
    assert cached[0]["flops"] == pytest.approx(expected[0]["flops"] * 3 / 4)


def test_pair_tokens_count_each_sequence(bench, tiny):
    """A shared batch's pair tokens are the real tokens of the same pairs padded."""
    from dpo_jax.data import batching, shared_prompts
    from dpo_jax.data.examples import TokenizedPair

    pairs = [TokenizedPair(*p) for p in tiny[3]]
    plan = shared_prompts.plan_shared_packing(pairs, num_rows=13, row_length=28, max_pairs=13)
    batch = shared_prompts.shared_batch(pairs, plan, row_length=28, max_pairs=13)
    padded = batching.pad_pairs(pairs, max_length=14)
    assert bench.pair_tokens(batch) == np.count_nonzero(padded["segment_ids"])
    assert bench.pair_tokens(padded) == np.count_nonzero(padded["segment_ids"])
    assert np.count_nonzero(batch["segment_ids"]) < bench.pair_tokens(batch)


def test_summary_and_table(bench):
    def step(seconds, pairs=2, tokens=30, slots=40, flops=1e9):
        return dict(seconds=seconds, pairs=pairs, tokens=tokens, slots=slots, flops=flops)

    rounds = [[step(1.0), step(1.0)], [step(0.5), step(0.5)], [step(2.0), step(2.0)]]
    s = bench.summarize(rounds, peak=2e9, pair_tokens=[15.0] * 3)
    assert s["pairs_per_s"] == pytest.approx(2.0)  # the median round's 4 pairs in 2 s
    assert s["per_round_pairs_per_s"] == pytest.approx([2.0, 4.0, 1.0])
    assert s["tokens_per_s"] == pytest.approx(30.0)
    assert s["padding_fraction"] == pytest.approx(0.25)
    assert s["gflop_per_pair"] == pytest.approx(0.5)
    assert s["mfu"] == pytest.approx(1e9 / 2e9)
    extra = {"setup_s": 1.0, "compile_s": 2.0, "peak_rss_mib": 100.0}
    rows = [
        {"system": "ours", "layout": "packed", "reference": "cached", **s, **extra},
        {"system": "trl", "layout": "padded", "reference": "params", **s, "pairs_per_s": 0.5,
         **extra},
    ]  # fmt: skip
    text = bench.table(rows)
    assert "| ours | packed | cached | 2.000 |" in text and "| 4.00x | - |" in text
    # Pair tokens (a shared prompt counted with each response) set the pairs/s.
    shared = [[{**step(1.0), "pair_tokens": 45}, {**step(1.0), "pair_tokens": 45}]] * 3
    s_shared = bench.summarize(shared, peak=2e9, pair_tokens=[15.0] * 3)
    assert s_shared["pairs_per_s"] == pytest.approx(3.0)  # 90 pair tokens / 2 s / 15
    assert s_shared["tokens_per_s"] == pytest.approx(30.0)
    assert s_shared["gflop_per_pair"] == pytest.approx(2e9 / 90 * 15 / 1e9)
    args = bench.parse_args(["--quick", "--dtype=bfloat16"])
    assert (args.rounds, args.steps, args.dtype) == (1, 1, "bfloat16")
    assert dataclasses.asdict(bench.Workload())["vocab"] == 32000  # issue 12's workload
    assert np.isfinite(s["step_s"])
