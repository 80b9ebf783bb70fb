"""Throughput and MFU of training steps: model FLOPs counted from the real sequences of each
batch, and the peak FLOP/s of the device they ran on.

FLOP count (PaLM, Chowdhery et al. 2022, app. B, as `models.presets.flops_per_token`): a
sequence of T real tokens costs

    train(T)   = T * (6 N + 12 * layers * heads * head_dim * T)   forward + backward
    forward(T) = train(T) / 3                                      forward only

with N the matmul params (lookup-only embedding tables excluded) and T capped at the
sliding window in the attention term (causal halving not applied, as PaLM and most MFU
reports do). T is each sequence's own length, never the padded or packed row length, so
padding and the cross-segment blocks of packed rows count as waste, not as work.

    DPO step:  sum over its 2B sequences of train(T) (policy)
               + forward(T) when the reference is params in the step (0 when cached or
               reference-free)
    KTO step:  train(T) on the examples, forward(T) of the policy on the KL sequences
               (no gradient flows there), forward(T) of the reference on both
    SFT step:  sum over its sequences of train(T)

A sequence is prompt + one response, so a prompt computed once per response is counted
once per response: it is work the step does. With prompt sharing (batches with
`prefix_segment_ids`) a response segment counts as the sequence prefix + response, and a
prefix read by k responses is taken off k - 1 times: the prompt counts once, as computed.
`dpo_jax.plan.model_flops` counts the same per token on full padded shapes (what a
roofline needs).

MFU = model FLOPs / step time / peak. Peaks: the dense bfloat16 peak of known
accelerators (table below, whatever the compute dtype, as MFU is usually quoted), else a
matmul in the model's compute dtype measured once per process on the device.
"""

from __future__ import annotations

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import presets
from dpo_jax.models.config import ModelConfig

# ------------------------------------------------------------------------------------------
# FLOPs of a batch
# ------------------------------------------------------------------------------------------


def sequence_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Real tokens of every sequence in `segment_ids: [..., L]` (0 = padding; a row holds
    segments 1, 2, ...): one entry per (row, segment) present, int64, row-major order."""
    seg = np.asarray(segment_ids)
    if seg.size == 0:
        return np.zeros((0,), np.int64)
    seg = seg.reshape(-1, seg.shape[-1]).astype(np.int64)
    width = int(seg.max()) + 1
    keys = np.arange(seg.shape[0])[:, None] * width + seg
    counts = np.bincount(keys[seg > 0], minlength=seg.shape[0] * width)
    return counts[counts > 0]


def train_flops(config: ModelConfig, lengths) -> float:
    """Forward + backward FLOPs of sequences of the given real lengths (module docstring)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0:
        return 0.0
    unique, counts = np.unique(lengths, return_counts=True)
    per_token = np.array([presets.flops_per_token(config, int(t)) for t in unique])
    return float(np.sum(per_token * unique * counts))


def shared_train_flops(config: ModelConfig, segment_ids, prefix_segment_ids) -> float:
    """`train_flops` of a shared packed batch (`dpo_jax.data.shared_prompts`), [R, L] each:
    every segment that no other names as its prefix is a sequence, extended by the prefix
    segment it names; each prefix segment read by k of them is subtracted k - 1 times."""
    seg, prefix = np.asarray(segment_ids), np.asarray(prefix_segment_ids)
    sequences, shared = [], []
    for row_seg, row_prefix in zip(seg, prefix, strict=True):
        ids, first, counts = np.unique(row_seg, return_index=True, return_counts=True)
        length = {int(s): int(n) for s, n in zip(ids, counts, strict=True) if s}
        reads = {int(s): int(row_prefix[i]) for s, i in zip(ids, first, strict=True) if s}
        readers = np.bincount([p for p in reads.values() if p], minlength=1)
        for s, p in reads.items():
            if s >= readers.size or not readers[s]:
                sequences.append(length[s] + (length[p] if p else 0))
        shared += [length[p] for p in np.flatnonzero(readers) for _ in range(readers[p] - 1)]
    return train_flops(config, sequences) - train_flops(config, shared)


def step_flops(config: ModelConfig, batch, *, stage: str, reference_forward: bool) -> float:
    """Model FLOPs of one step on `batch` (numpy, any layout of `dpo_jax.data.batching`).

    stage: "sft", "dpo" (paired) or "unpaired" (KTO). reference_forward: the step runs the
    reference model (frozen params), i.e. not cached and not reference-free.
    """
    seg = batch["segment_ids"]
    if stage == "unpaired":  # [B, 2, L]: side 0 trains, side 1 (KL sequences) forward only
        examples = train_flops(config, sequence_lengths(seg[:, 0]))
        kl = train_flops(config, sequence_lengths(seg[:, 1])) / 3
        return examples + kl + (examples + 3 * kl) / 3 * reference_forward
    if "prefix_segment_ids" in batch:
        policy = shared_train_flops(config, seg, batch["prefix_segment_ids"])
    else:
        policy = train_flops(config, sequence_lengths(seg))
    return policy * (1 + reference_forward / 3) if stage == "dpo" else policy


# ------------------------------------------------------------------------------------------
# Peak FLOP/s
# ------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) bfloat16 Tensor Core peak per GPU, from NVIDIA's datasheets:
# A100 (SXM and PCIe) 312 TFLOP/s; H100 SXM 989, H100 PCIe 756 (H100 datasheet);
# H200 989 (H200 datasheet). Matched on `device_kind` (e.g. "NVIDIA H100 80GB HBM3"),
# first match wins, so "h100 pcie" precedes "h100".
GPU_PEAK_FLOPS = (("a100", 312e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12))
# TPU `device_kind` -> generation in `dpo_jax.plan.CHIPS` (which cites its sources).
TPU_GENERATIONS = {
    "tpu v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5": "v5p",
    "tpu v5p": "v5p",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
}


def table_peak_flops(device_kind: str) -> float | None:
    """Dense bfloat16 peak FLOP/s of a known accelerator, or None."""
    kind = device_kind.lower().strip()
    if kind in TPU_GENERATIONS:
        from dpo_jax.plan import CHIPS  # the TPU chip table lives with the pod planner

        return CHIPS[TPU_GENERATIONS[kind]].peak_flops
    return next((peak for name, peak in GPU_PEAK_FLOPS if name in kind), None)


@functools.cache
def measured_matmul_flops(dtype: str = "float32", size: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device, best of
    `reps` after one warm-up; measured once per process and argument set."""
    a = jnp.ones((size, size), dtype) / size
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, a))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(matmul(a, a))
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def peak_flops_per_device(dtype: str = "float32", device=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it comes from). Known accelerators: the table;
    anything else (CPU): a measured matmul in `dtype`, shared by the local devices of that
    platform (fake CPU devices split one host's cores)."""
    device = device or jax.local_devices()[0]
    peak = table_peak_flops(device.device_kind)
    if peak is not None:
        return peak, f"{device.device_kind} bf16 dense peak (table)"
    measured = measured_matmul_flops(dtype)
    shared = sum(d.platform == device.platform for d in jax.local_devices())
    source = f"measured {dtype} matmul on {device.platform}"
    if shared > 1:
        source += f", shared by {shared} devices"
    return measured / shared, source


# ------------------------------------------------------------------------------------------
# The training loop's meter
# ------------------------------------------------------------------------------------------


ITEM_RATES = {"dpo": "pairs_per_s", "unpaired": "examples_per_s", "sft": "sequences_per_s"}


class Meter:
    """Real tokens, pairs (or examples) and model FLOPs of the steps since the last read,
    over the training time between reads; time spent in `paused()` (evaluation,
    checkpoints) is not counted. Counts come from this process's host batches; global rates
    assume every process holds an equal share, as its batch size is fixed.

    The first window after a start includes the step's compilation.
    """

    def __init__(self, config: ModelConfig, *, stage: str, reference_forward: bool):
        self.config, self.stage, self.reference_forward = config, stage, reference_forward
        devices = jax.local_devices()
        self.num_devices = len(devices)
        self.peak, self.peak_source = peak_flops_per_device(config.dtype, devices[0])
        self._restart()

    def _restart(self) -> None:
        self.tokens = self.items = self.flops = 0.0
        self.excluded, self.start = 0.0, time.perf_counter()

    def add(self, batch) -> None:
        """Counts one step's host batch (before it is sent to the devices)."""
        self.tokens += float(np.count_nonzero(batch["segment_ids"]))
        mask = batch.get("example_mask" if self.stage == "sft" else "pair_mask")
        if mask is None:  # an SFT batch without example_mask: its non-empty rows
            mask = np.any(batch["segment_ids"] != 0, axis=-1)
        self.items += float(np.count_nonzero(mask))
        self.flops += step_flops(
            self.config, batch, stage=self.stage, reference_forward=self.reference_forward
        )

    @contextlib.contextmanager
    def paused(self, state):
        """Excludes the body's time; the steps dispatched so far (`state`) finish first, so
        their time still counts."""
        jax.block_until_ready(state)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def read(self) -> dict[str, float]:
        """Rates since the last read (the steps must have finished: the caller has synced
        on their metrics), then restarts the window."""
        seconds = max(time.perf_counter() - self.start - self.excluded, 1e-9)
        processes = jax.process_count()
        per_device = self.flops / self.num_devices / seconds
        rates = {
            "tokens_per_s": self.tokens * processes / seconds,
            ITEM_RATES[self.stage]: self.items * processes / seconds,
            "tflops_per_device": per_device / 1e12,
            "mfu": per_device / self.peak,
            "peak_tflops_per_device": self.peak / 1e12,
        }
        self._restart()
        return rates
