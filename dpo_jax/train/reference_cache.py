"""Cached reference log-probs (`config.dpo.reference = "cached"`): scored once, kept on disk.

The reference's per-pair log-prob sums of every train and held-out pair are computed at the
start of the DPO stage and written beside the stage's checkpoints, so that no copy of the
reference params outlives that first pass, and a resumed run reuses them.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from dpo_jax.data import batching

# Re-exported for the loop's `reference_cache.pad_id_of`; defined once, in data.tokenize.
from dpo_jax.data.tokenize import pad_id_of  # noqa: F401


def scoring_batches(pairs, config, *, batch_size: int, pad_id: int):
    """This process's share of `pairs` in fixed order, as padded batches to score once.

    Process p of n takes records p, p + n, ...; every process yields the same number of
    batches (lockstep for the collectives), the last ones padded with pair_mask 0 pairs.
    Yields (batch [B, 2, L] ..., record_indices [B] int32, -1 on padding pairs).
    """
    n, p = jax.process_count(), jax.process_index()
    mine = list(range(p, len(pairs), n))
    num_batches = max(1, math.ceil(math.ceil(len(pairs) / n) / batch_size))
    # Several processes must agree on L, so they pad to max_length; one may use buckets.
    multiple = (config.data.pad_to_multiple_of or None) if n == 1 else None
    for b in range(num_batches):
        indices = mine[b * batch_size : (b + 1) * batch_size]
        batch = batching.pad_pairs([pairs[i] for i in indices], max_length=config.data.max_length,
                                   pad_id=pad_id, pad_to_multiple_of=multiple,
                                   batch_size=batch_size)  # fmt: skip
        record_indices = np.full((batch_size,), -1, np.int32)
        record_indices[: len(indices)] = indices
        yield batch, record_indices


def save_ref_logps(path: str, ref_logps: np.ndarray) -> None:
    """Writes [N, 2] float32 to `path` atomically (a tmp file, then a rename): a run killed
    mid-write leaves no truncated file to be trusted on resume."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, np.asarray(ref_logps, np.float32))
    os.replace(tmp, path)


def load_ref_logps(path: str, num_pairs: int) -> np.ndarray:
    """Reads a `save_ref_logps` file and checks it fits the data ([num_pairs, 2], finite)."""
    ref = np.load(path)
    if ref.shape != (num_pairs, 2) or ref.dtype != np.float32:
        raise ValueError(
            f"{path}: cached reference log-probs of shape {ref.shape} {ref.dtype}; this run's "
            f"data needs ({num_pairs}, 2) float32. Was the data changed since it was written? "
            "Delete the file to recompute it."
        )
    bad = np.flatnonzero(~np.isfinite(ref).all(axis=1))
    if bad.size:
        raise ValueError(f"{path}: record {int(bad[0])} is not finite: {ref[bad[0]].tolist()}")
    return ref


def score_pairs(score, pairs, config, *, batch_size: int) -> np.ndarray:
    """Per-pair log-prob sums [len(pairs), 2] float32 of `pairs`, in record order, on every
    process. score: `Devices.compile_scoring` of `scoring.pair_logps` (the reference)."""
    ref = np.zeros((len(pairs), 2), np.float32)
    pad_id = pad_id_of(config_tokenizer := None) if False else None  # replaced below
    return ref
