"""Cached reference log-probs (`config.dpo.reference = "cached"`): scored once, kept on disk.

The reference's per-pair log-prob sums of every train and held-out pair are computed at the
start of the DPO stage and written beside the stage's checkpoints, so that no copy of the
reference params outlives that first pass, and a resumed run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import jax
import numpy as np

from dpo_jax.data import batching
from dpo_jax.data.tokenize import pad_id_of
from dpo_jax.train.workdir import pairs_fingerprint

log = logging.getLogger(__name__)


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
        batch = batching.pad_pairs(
            [pairs[i] for i in indices],
            max_length=config.data.max_length,
            pad_id=pad_id,
            pad_to_multiple_of=multiple,
            batch_size=batch_size,
        )
        record_indices = np.full((batch_size,), -1, np.int32)
        record_indices[: len(indices)] = indices
        yield batch, record_indices


def score_pairs(score, pairs, config, *, batch_size: int, tokenizer) -> np.ndarray:
    """Per-pair log-prob sums [len(pairs), 2] float32 of `pairs`, in record order, on every
    process. score: `Devices.compile_scoring` of `scoring.pair_logps` (the reference)."""
    ref = np.zeros((len(pairs), 2), np.float32)
    pad_id = pad_id_of(tokenizer)
    for local, indices in scoring_batches(pairs, config, batch_size=batch_size, pad_id=pad_id):
        out, indices = score(local, indices)
        ref[indices[indices >= 0]] = out[indices >= 0]
    return ref


def save_ref_logps(path: str, ref_logps: np.ndarray, key: str) -> None:
    """Writes [N, 2] float32 to `path`, and `key` (what the sums were computed from, see
    `load_ref_logps`) beside it in `<path>.json`. Both atomically (a tmp file, then a
    rename), the sums last: a run killed mid-write leaves no file to be trusted on resume."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _atomic_write(path + ".json", json.dumps({"key": key, "num_pairs": len(ref_logps)}).encode())
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, np.asarray(ref_logps, np.float32))
    os.replace(tmp, path)


def _atomic_write(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def load_ref_logps(path: str, num_pairs: int, key: str) -> np.ndarray | None:
    """The cached sums of `path` if they were computed from what `key` describes (the
    reference params, the tokenized pairs and the scoring options), else None (stale: the
    caller recomputes). Raises when a matching file does not fit the data or is not
    finite."""
    meta_path = path + ".json"
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        return None
    with open(meta_path) as f:
        stored = json.load(f).get("key")
    if stored != key:
        log.warning(
            "%s: cached reference log-probs were computed from other params, data or "
            "scoring options (key %s, now %s); recomputing them.",
            path,
            stored,
            key,
        )
        return None
    return batching.check_ref_logps(np.load(path), num_pairs, path)


def cache_key(params_fingerprint: str, pairs, scoring_options, max_length: int) -> str:
    """What cached sums depend on: the reference params (`workdir.params_fingerprint`),
    every tokenized pair (ids and the response split), the scoring options and the padded
    length."""
    extra = {"scoring": repr(scoring_options), "max_length": max_length}
    pairs_fp = pairs_fingerprint(pairs, extra)
    return hashlib.sha256(f"{params_fingerprint}\0{pairs_fp}".encode()).hexdigest()
