"""Grain input pipeline: seeded shuffle, epochs, per-process shards, static-shape batches.

    items (a list of `TokenizedPair` / `TokenizedSequence`, parsed and tokenized up front
    by `sources.parse_records` + `tokenize.tokenize_examples`, bad records already
    raised or skipped there with their file and line)
      -> item index stream: shuffle(seed) per epoch, repeat(num_epochs)        (grain)
      -> this process's shard: stream positions shard_index, +shard_count, ...
      -> batch: padded, packed or packed_shared (layouts: the top of `batching`), fixed B
         per process

Why grain `MapDataset` and not `DataLoader`: every stage is a pure function of the stream
position, so the iterator state is one integer (the next position) plus the positions of
pairs held back by packing. That state is exact, small and JSON, and restoring it gives
exactly the batches an uninterrupted run would have given. (`DataLoader` state is the same
idea, but needs a sampler and its own batching, which would bypass `batching.py`.)

Sharding: the shuffled stream of all epochs is dealt out round-robin: process p of n gets
positions p, p + n, p + 2n, ... So each epoch is one global permutation (not n separate
shard shuffles), the processes' shards are disjoint and cover the data, and a step's
global batch is the same set of items whatever the number of processes. With a finite
stream, every process yields the same number of items (lockstep for collectives): the
last one is cut to floor(total / n) items (`drop_remainder=True`) or padded up to
ceil(total / n) with empty slots that become pair_mask 0 rows.

Partial batches: the last batch is padded with pair_mask = 0 pairs (default) or dropped
(`drop_remainder=True`). Batches run across epoch boundaries; only the end of the last
epoch makes a partial batch. Packing (`layout="packed"`) fills R rows from a buffer of
pairs (first-fit decreasing, `batching.plan_packing`); pairs that do not fit wait in the
buffer for the next batch. Packed batch counts depend on lengths, so processes may differ
by a batch at the very end of a finite stream: stop training at a fixed step count.
Prompt sharing (`layout="packed_shared"`, `shared_prompts`) packs the same way, whole pairs
(prompt once, both responses) into rows of 2 * max_length tokens, which any pair fits.

Cached reference log-probs: `ref_logps` [N, 2] aligned with the items (item i -> row i)
ride along: each batch gets `ref_logps` [B, 2] for its pairs (0 for padding pairs), looked
up from the stream position's item index, so shuffling, sharding, pairs held back by
packing and restored states all carry them without any extra iterator state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import grain
import numpy as np

from dpo_jax.data import batching, shared_prompts
from dpo_jax.data.batch_iterator import EMPTY, BatchIterator, EmptySlot
from dpo_jax.data.examples import TokenizedPair, TokenizedSequence, TokenizedUnpaired

Layout = Literal["padded", "packed", "packed_shared"]
LAYOUTS = ("padded", "packed", "packed_shared")
PACKED_LAYOUTS = ("packed", "packed_shared")


# ----------------------------------------------------------------------------------------
# The per-process stream of record indices
# ----------------------------------------------------------------------------------------


def shard_stream(
    num_records: int,
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
    drop_remainder: bool,
) -> grain.MapDataset:
    """This process's record indices: position k holds global stream position k*n + p.

    The global stream is `num_epochs` passes (None: endless), each a permutation of
    range(num_records) seeded by (seed, epoch) (or the identity without shuffle). A finite
    stream is cut (drop_remainder) or padded with empty slots to the same length on every
    process.
    """
    if num_records < 1:
        raise ValueError("the source is empty: nothing to iterate over")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (endless) or >= 1, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    ds = grain.MapDataset.range(num_records)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    # repeat() reseeds the shuffle per epoch, so each epoch is a different permutation.
    ds = ds.repeat(num_epochs)
    shard = ds[shard_index::shard_count]
    if num_epochs is None:
        return shard
    total = num_records * num_epochs
    length = total // shard_count if drop_remainder else math.ceil(total / shard_count)
    if len(shard) > length:
        shard = shard[:length]
    elif len(shard) < length:
        pad = grain.MapDataset.source([EMPTY] * (length - len(shard)))
        shard = grain.MapDataset.concatenate([shard, pad])
    return shard


# ----------------------------------------------------------------------------------------
# Public constructors
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IteratorSpec:
    """How to stream and batch: everything that shapes the batches, in one frozen object.

    batch_size: B, pairs (sequences) per batch on this process (the capacity when packed).
    max_length: padded: the longest allowed length L; packed: the row length L;
      packed_shared: the longest sequence (prompt + one response), rows being 2 max_length.
    pad_id: the padding token (`tokenize.pad_id_of(tokenizer)`).
    seed, shuffle, num_epochs: the stream (num_epochs None = endless).
    shard_index, shard_count: this process's shard; None: jax.process_index() /
      jax.process_count().
    layout: "padded", "packed" or "packed_shared" (see the top of `batching`; SFT: padded
      only).
    drop_remainder: drop (True) or pad with pair_mask 0 (False) the last partial batch.
    pad_to_multiple_of, buckets: padded layout: allowed lengths below max_length
      (`batching.allowed_lengths`); default: always L = max_length.
    num_rows: packed layouts: rows R per batch (default B; packed_shared: ceil(B / 2), the
      same token slots as packed).
    pack_buffer_size: packed layouts: pairs the packer chooses from (default 2 B).
    source_name: names the items in errors ("<name>, item <i>").
    """

    batch_size: int
    max_length: int
    pad_id: int = 0
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    shard_index: int | None = None
    shard_count: int | None = None
    layout: Layout = "padded"
    drop_remainder: bool = False
    pad_to_multiple_of: int | None = None
    buckets: Sequence[int] | None = None
    num_rows: int | None = None
    pack_buffer_size: int | None = None
    source_name: str = "source"

    def state_spec(self, kind: str, num_records: int) -> dict:
        """The fields a restored iterator state must match, as JSON (the saved states' keys)."""
        shard_index, shard_count = self.shard_index, self.shard_count
        if shard_index is None or shard_count is None:
            import jax  # only when the caller leaves the shard to the JAX process layout

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        spec = {
            "kind": kind,
            "num_records": int(num_records),
            "seed": int(self.seed),
            "shuffle": bool(self.shuffle),
            "num_epochs": None if self.num_epochs is None else int(self.num_epochs),
            "shard_index": int(shard_index),
            "shard_count": int(shard_count),
            "batch_size": int(self.batch_size),
            "max_length": int(self.max_length),
            "layout": self.layout,
            "drop_remainder": bool(self.drop_remainder),
            "pad_id": int(self.pad_id),
        }
        if self.layout in PACKED_LAYOUTS:
            num_rows = spec["batch_size"]
            if self.layout == "packed_shared":
                num_rows = -(-num_rows // 2)
            num_rows = num_rows if self.num_rows is None else int(self.num_rows)
            if num_rows < 1:
                raise ValueError(f"num_rows must be >= 1, got {num_rows}")
            buffer = self.pack_buffer_size
            buffer = 2 * spec["batch_size"] if buffer is None else int(buffer)
            if buffer < 1:
                raise ValueError(f"pack_buffer_size must be >= 1, got {buffer}")
            spec.update(num_rows=num_rows, pack_buffer_size=buffer)
        else:
            multiple = self.pad_to_multiple_of
            spec.update(
                pad_to_multiple_of=None if multiple is None else int(multiple),
                buckets=None if self.buckets is None else [int(b) for b in self.buckets],
            )
        return spec


def make_preference_iterator(
    pairs: Sequence[TokenizedPair], spec: IteratorSpec, *, ref_logps: np.ndarray | None = None
) -> BatchIterator:
    """Batches of tokenized preference pairs; see the module docstring.

    ref_logps: optional cached reference log-prob sums [N = len(pairs), 2] float32 (column
      0 chosen, 1 rejected); batches then carry `ref_logps` [B, 2] of their pairs (0 for
      padding pairs).
    """
    state_spec = spec.state_spec("preference", len(pairs))
    _check_items(pairs, TokenizedPair, ("chosen_ids", "rejected_ids"), spec)
    if ref_logps is not None:
        ref_logps = batching.check_ref_logps(ref_logps, len(pairs), spec.source_name)
    B, L, pad_id = state_spec["batch_size"], state_spec["max_length"], state_spec["pad_id"]
    if spec.layout == "packed":
        R = state_spec["num_rows"]

        def batch_fn(items, ref):
            plan = batching.plan_packing(items, num_rows=R, row_length=L, max_pairs=B)
            batch = batching.packed_batch(
                items, plan, row_length=L, max_pairs=B, pad_id=pad_id, ref_logps=ref
            )
            return batch, plan.leftover

    elif spec.layout == "packed_shared":
        R, row_length = state_spec["num_rows"], 2 * L

        def batch_fn(items, ref):
            plan = shared_prompts.plan_shared_packing(
                items, num_rows=R, row_length=row_length, max_pairs=B
            )
            batch = shared_prompts.shared_batch(
                items, plan, row_length=row_length, max_pairs=B, pad_id=pad_id, ref_logps=ref
            )
            return batch, plan.leftover

    else:

        def batch_fn(items, ref):
            extra = {} if ref is None else {"ref_logps": ref}
            return batching.pad_pairs(items, **_pad_kwargs(state_spec), **extra)

    return _make_iterator(pairs, state_spec, batch_fn, ref_logps)


def make_sft_iterator(sequences: Sequence[TokenizedSequence], spec: IteratorSpec) -> BatchIterator:
    """Padded SFT batches (the layout: top of `batching`); stream, sharding and state as
    `make_preference_iterator`."""
    return _padded_iterator("sft", sequences, TokenizedSequence, batching.pad_sequences, spec)


def make_unpaired_iterator(items: Sequence[TokenizedUnpaired], spec: IteratorSpec) -> BatchIterator:
    """Padded unpaired (KTO) batches, each example with its KL sequence built from the
    other examples of its batch (`batching.pad_unpaired`); stream, sharding and state as
    `make_preference_iterator`."""
    return _padded_iterator("unpaired", items, TokenizedUnpaired, batching.pad_unpaired, spec)


def _padded_iterator(kind: str, items, item_type, pad, spec: IteratorSpec) -> BatchIterator:
    """Batches `pad(items, **padding options)` of single sequences (no packing, no cached
    reference sums)."""
    if spec.layout != "padded":
        what = "SFT" if kind == "sft" else kind
        raise ValueError(f"{what} batches are padded; got layout={spec.layout!r}")
    state_spec = spec.state_spec(kind, len(items))
    _check_items(items, item_type, ("completion_ids",), spec)

    def batch_fn(batch_items, ref):
        return pad(batch_items, **_pad_kwargs(state_spec))

    return _make_iterator(items, state_spec, batch_fn, None)


def _pad_kwargs(state_spec: dict) -> dict:
    keys = ("max_length", "pad_id", "pad_to_multiple_of", "buckets", "batch_size")
    return {k: state_spec[k] for k in keys}


def _check_items(items: Sequence, item_type: type, fields: tuple[str, ...], spec) -> None:
    """Refuses items that are not tokenized or do not fit max_length, naming the item.

    Checked once here: batching would only know an item's place in its batch.
    """
    for i, item in enumerate(items):
        if not isinstance(item, item_type):
            raise TypeError(
                f"{spec.source_name}, item {i}: expected {item_type.__name__} (tokenize "
                f"records first: tokenize.tokenize_examples), got {type(item).__name__}"
            )
        for field in fields:
            n = len(item.prompt_ids) + len(getattr(item, field))
            if n > spec.max_length:
                raise ValueError(
                    f"{spec.source_name}, item {i}: {len(item.prompt_ids)} prompt + "
                    f"{n - len(item.prompt_ids)} {field} tokens > max_length={spec.max_length}"
                )


def _make_iterator(items: Sequence, state_spec: dict, batch_fn, ref_logps) -> BatchIterator:
    """The shared tail of the constructors: the sharded stream and its iterator."""
    if state_spec["layout"] == "padded":  # fail on bad lengths now, not at the first batch
        batching.allowed_lengths(
            state_spec["max_length"],
            pad_to_multiple_of=state_spec["pad_to_multiple_of"],
            buckets=state_spec["buckets"],
        )
    stream = shard_stream(
        state_spec["num_records"],
        seed=state_spec["seed"],
        shuffle=state_spec["shuffle"],
        num_epochs=state_spec["num_epochs"],
        shard_index=state_spec["shard_index"],
        shard_count=state_spec["shard_count"],
        drop_remainder=state_spec["drop_remainder"],
    )

    def lookup(index):
        return index if isinstance(index, EmptySlot) else items[int(index)]

    return BatchIterator(
        stream.map(lookup), batch_fn, spec=state_spec, record_indices=stream, ref_logps=ref_logps
    )
