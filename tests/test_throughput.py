"""Model FLOPs of a step counted by hand, the peak table, and the throughput metrics of a
tiny run's metrics.jsonl."""

from __future__ import annotations

import numpy as np
import pytest
from test_loop import load_config, read_metrics

from dpo_jax.data import batching
from dpo_jax.data.examples import TokenizedPair, TokenizedUnpaired
from dpo_jax.models.config import ModelConfig
from dpo_jax.plan import CHIPS
from dpo_jax.train import loop, throughput

# D 16, 2 layers, 2 query heads and 1 kv head of 8, MLP 32, vocab 64, untied head.
CONFIG = ModelConfig(
    vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
    mlp_dim=32, tie_embeddings=False,
)  # fmt: skip
# Matmul params by hand: per layer q 16*16 + k 16*8 + v 16*8 + o 16*16 = 768, gated MLP
# 3*16*32 = 1536, two RMSNorm scales 32 -> 2336; two layers 4672; final norm 16; head
# 16*64 = 1024 (the untied input embedding is a lookup, not counted).
N_MATMUL = 4672 + 16 + 1024
ATTENTION = 12 * 2 * 2 * 8  # 12 * layers * heads * head_dim, per token and key


def train_by_hand(lengths):
    return sum(t * (6 * N_MATMUL + ATTENTION * t) for t in lengths)


PAIRS = [  # (prompt, chosen, rejected) lengths (3, 4, 2) and (2, 3, 6)
    TokenizedPair([5, 6, 7], [8, 9, 10, 2], [11, 2]),
    TokenizedPair([5, 6], [12, 13, 2], [14, 15, 16, 17, 18, 2]),
]
LENGTHS = [7, 5, 5, 8]


def test_dpo_flops_equal_a_hand_count_in_both_layouts():
    padded = batching.pad_pairs(PAIRS, max_length=16, batch_size=3)  # a padding pair too
    plan = batching.plan_packing(PAIRS, num_rows=2, row_length=16, max_pairs=3)
    packed = batching.packed_batch(PAIRS, plan, row_length=16, max_pairs=3)
    assert sorted(throughput.sequence_lengths(packed["segment_ids"])) == sorted(LENGTHS)
    policy = train_by_hand(LENGTHS)
    for batch in (padded, packed):
        assert throughput.sequence_lengths(batch["segment_ids"]).sum() == sum(LENGTHS)
        cached = throughput.step_flops(CONFIG, batch, stage="dpo", reference_forward=False)
        frozen = throughput.step_flops(CONFIG, batch, stage="dpo", reference_forward=True)
        assert cached == pytest.approx(policy, rel=1e-12)
        assert frozen == pytest.approx(policy * 4 / 3, rel=1e-12)  # + a forward (2N per token)


def test_sft_and_kto_flops_equal_a_hand_count():
    sft = {"segment_ids": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert throughput.step_flops(
        CONFIG, sft, stage="sft", reference_forward=False
    ) == pytest.approx(train_by_hand([3, 2]))
    items = [TokenizedUnpaired([5, 6], [7, 2], True), TokenizedUnpaired([5], [8, 9, 2], False)]
    batch = batching.pad_unpaired(items, max_length=8)
    # Examples 4 and 4 tokens; KL sequences: prompt + the previous completion, 5 and 3.
    examples, kl = train_by_hand([4, 4]), train_by_hand([5, 3])
    got = throughput.step_flops(CONFIG, batch, stage="unpaired", reference_forward=True)
    assert got == pytest.approx(examples + kl / 3 + (examples + kl) / 3)


def test_peak_table_and_measured_cpu_peak():
    assert throughput.table_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.table_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert throughput.table_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert throughput.table_peak_flops("TPU v5 lite") == CHIPS["v5e"].peak_flops
    assert throughput.table_peak_flops("TPU v4") == CHIPS["v4"].peak_flops
    assert throughput.table_peak_flops("cpu") is None
    peak, source = throughput.peak_flops_per_device("float32")
    assert 1e8 < peak < 1e13 and "measured float32 matmul" in source
    # Measured once per process: the second call returns the same number.
    assert throughput.peak_flops_per_device("float32")[0] == peak


def test_tiny_run_logs_throughput_and_the_summary_prints_it(tmp_path):
    config = load_config("dpo")
    with config.unlocked():
        config.dpo.steps = 3
        config.log.every_steps = 1
        config.eval.every_steps = 100  # evaluated at steps 0 and 3 only
        config.checkpoint.every_steps = 100
    workdir = str(tmp_path)
    loop.run(config, workdir)
    train = [r for r in read_metrics(workdir) if r["stage"] == "dpo" and "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for key in ("tokens_per_s", "pairs_per_s", "tflops_per_device", "mfu"):
            assert np.isfinite(r[key]) and r[key] > 0, (key, r)
        # Real tokens: at most the slots of the batch, here (1 - padding) of them.
        assert r["pairs_per_s"] * 2 < r["tokens_per_s"]
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / r["peak_tflops_per_device"])
    assert "Throughput dpo (median of 2 log windows after the first)" in loop.summarize(workdir)
