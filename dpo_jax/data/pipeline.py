"""Grain input pipeline: seeded shuffle, epochs, per-process shards, tokenize, static batches.

    source (random access: list of records, tfds data source, ...)
      -> record index stream: shuffle(seed) per epoch, repeat(num_epochs)     (grain)
      -> this process's shard: stream positions shard_index, +shard_count, ...
      -> map: read record -> parse (formats) -> tokenize  = TokenizedPair      (grain threads)
      -> batch: padded [B, 2, L] or packed [R, L] (batching), a fixed B per process

Why grain `MapDataset` and not `DataLoader`: every stage is a pure function of the stream
position, so the iterator state is one integer (the next position) plus the positions of
pairs held back by packing. That state is exact, small and JSON, and restoring it gives
exactly the batches an uninterrupted run would have given. (`DataLoader` state is the same
idea, but needs a sampler and its own batching, which would bypass `batching.py`.)

Sharding: the shuffled stream of all epochs is dealt out round-robin: process p of n gets
positions p, p + n, p + 2n, ... So each epoch is one global permutation (not n separate
shard shuffles), the processes' shards are disjoint and cover the data, and a step's
global batch is the same set of records whatever the number of processes. With a finite
stream, every process yields the same number of records (lockstep for collectives): the
last one is cut to floor(total / n) records (`drop_remainder=True`) or padded up to
ceil(total / n) with empty slots that become pair_mask 0 rows.

Partial batches: the last batch is padded with pair_mask = 0 pairs (default) or dropped
(`drop_remainder=True`). Batches run across epoch boundaries; only the end of the last
epoch makes a partial batch. Packing (`layout="packed"`) fills R rows from a buffer of
pairs (first-fit decreasing, `batching.plan_packing`); pairs that do not fit wait in the
buffer for the next batch. Packed batch counts depend on lengths, so processes may differ
by a batch at the very end of a finite stream: stop training at a fixed step count.

Bad records (unparsable, or untokenizable, e.g. no room left for the response) follow
`on_bad_record`: "raise" -> a `RecordError` naming the source, record index and field;
"skip" -> dropped (the batch is refilled from the next records) and counted in
`iterator.bad_records` (restored with the state). Skipping makes the processes' record
counts differ; for a finite multi-process run, stop at a fixed step count.

Cached reference log-probs: `ref_logps` [N, 2] aligned with the source (record i ->
row i) ride along: each batch gets `ref_logps` [B, 2] for its pairs (0 for padding pairs),
looked up from the stream position's record index, so shuffling, sharding, pairs held
back by packing and restored states all carry them without any extra iterator state.

Threads: `num_threads` grain threads parse and tokenize ahead of the consumer. The default
(1) keeps a Hugging Face tokenizer from being called concurrently; raise it only for a
thread-safe `tokenize_fn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import grain
import numpy as np

from dpo_jax.data import batching
from dpo_jax.data.batch_iterator import EMPTY, Bad, BatchIterator, EmptySlot
from dpo_jax.data.examples import (
    Location,
    OnBadRecord,
    PreferenceExample,
    RecordError,
    SFTExample,
    TokenizedPair,
    TokenizedSequence,
)
from dpo_jax.data.formats import parse_preference, parse_sft
from dpo_jax.data.tokenize import TokenizeConfig, tokenize_pair, tokenize_sequence

Layout = Literal["padded", "packed"]
LAYOUTS = ("padded", "packed")


# ----------------------------------------------------------------------------------------
# Records -> tokenized items
# ----------------------------------------------------------------------------------------


def decode_record(record: Any, location: Location | None = None) -> Any:
    """Decodes a tfds record's UTF-8 `bytes` (and 0-d numpy values) to plain Python values.

    Other records (dicts of str, examples) are returned unchanged.
    """
    if not isinstance(record, Mapping):
        return record
    out = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError("invalid_utf8", f"not valid UTF-8 ({err.reason})", field=key).at(
                    location
                ) from None
        out[key] = value
    return out


class _Prepare:
    """Stream element (a source index) -> tokenized item, `Bad`, or `EMPTY` unchanged."""

    def __init__(self, source, parse_fn, tokenize_fn, item_type, name: str, max_length: int):
        self.source = source
        self.parse_fn = parse_fn
        self.tokenize_fn = tokenize_fn
        self.item_type = item_type
        self.name = name
        self.max_length = max_length

    def _check_length(self, item) -> None:
        # Caught here, a too-long item is a bad record with its index (batching would only
        # know its place in the batch).
        for field in ("chosen_ids", "rejected_ids", "completion_ids"):
            response = getattr(item, field, None)
            if response is not None and len(item.prompt_ids) + len(response) > self.max_length:
                raise RecordError(
                    "too_long",
                    f"{len(item.prompt_ids)} prompt + {len(response)} response tokens > "
                    f"max_length={self.max_length}",
                    field=field,
                )

    def __call__(self, index):
        if isinstance(index, EmptySlot):
            return index
        index = int(index)
        location = Location(self.name, index, "record")
        try:
            item = self.source[index]
            if not isinstance(item, self.item_type):
                example = self.parse_fn(decode_record(item, location), location)
                item = self.tokenize_fn(example)
                if not isinstance(item, self.item_type):
                    raise TypeError(
                        f"{location}: tokenize_fn returned {type(item).__name__}, "
                        f"expected {self.item_type.__name__}"
                    )
            self._check_length(item)
            return item
        except RecordError as err:
            return Bad(err.at(location))


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


def _process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only when the caller leaves the shard to the JAX process layout

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    return int(shard_index), int(shard_count)


# kind -> (parse one record, tokenize one example, example type, tokenized item type)
_KINDS = {
    "preference": (parse_preference, tokenize_pair, PreferenceExample, TokenizedPair),
    "sft": (parse_sft, tokenize_sequence, SFTExample, TokenizedSequence),
}


def make_preference_iterator(
    source: Sequence,
    tokenizer=None,
    *,
    tokenize_config: TokenizeConfig | None = None,
    tokenize_fn: Callable[[PreferenceExample], TokenizedPair] | None = None,
    parse_fn: Callable[[Any], PreferenceExample] | None = None,
    record_format: str = "auto",
    batch_size: int,
    max_length: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    layout: Layout = "padded",
    drop_remainder: bool = False,
    pad_id: int | None = None,
    pad_to_multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
    num_rows: int | None = None,
    pack_buffer_size: int | None = None,
    on_bad_record: OnBadRecord = "raise",
    source_name: str = "source",
    num_threads: int = 1,
    prefetch_buffer_size: int = 256,
    ref_logps: np.ndarray | None = None,
) -> BatchIterator:
    """Batches of preference pairs from a random-access `source`; see the module docstring.

    Args:
      source: a sequence (`len`, `[i]`) of raw records (dicts; tfds bytes are decoded),
        `PreferenceExample`s or `TokenizedPair`s, e.g. a list or `tfds.data_source(...)`.
      tokenizer, tokenize_config: tokenize with `tokenize.tokenize_pair`; the tokenizer
        also renders conversational records with its chat template. Or instead
      tokenize_fn: `PreferenceExample -> TokenizedPair` (raise `RecordError` for bad pairs).
      parse_fn: `record -> PreferenceExample`; default `formats.parse_preference` with
        `record_format` ("auto" or a format name).
      batch_size: B, pairs per batch on this process (the capacity when packed).
      max_length: L (padded: the longest allowed length; packed: the row length); default
        tokenize_config.max_length.
      seed, shuffle, num_epochs: the stream (num_epochs None = endless).
      shard_index, shard_count: this process's shard; default jax.process_index() /
        jax.process_count().
      layout: "padded" -> tokens/positions/segment_ids/loss_mask [B, 2, L], pair_mask [B];
        "packed" -> the same keys plus slot_ids as [R, L], pair_mask [B].
      drop_remainder: drop (True) or pad with pair_mask 0 (False) the last partial batch.
      pad_id: padding token; default the tokenizer's pad_token_id, else 0.
      pad_to_multiple_of, buckets: padded layout: allowed lengths below max_length
        (`batching.allowed_lengths`); default: always L = max_length.
      num_rows: packed layout: rows R per batch (default B).
      pack_buffer_size: packed layout: pairs the packer chooses from (default 2 B).
      on_bad_record: "raise" or "skip" (counted in `iterator.bad_records`).
      source_name: names the source in errors ("<name>, record <i>").
      num_threads, prefetch_buffer_size: grain prefetching (see the module docstring).
      ref_logps: optional cached reference log-prob sums [N = len(source), 2] float32
        (column 0 chosen, 1 rejected); batches then carry `ref_logps` [B, 2] of their pairs
        (0 for padding pairs), e.g. from `steps.reference_logps` over the source.
    """
    return _make_iterator("preference", **locals())


def make_sft_iterator(
    source: Sequence,
    tokenizer=None,
    *,
    tokenize_config: TokenizeConfig | None = None,
    tokenize_fn: Callable[[SFTExample], TokenizedSequence] | None = None,
    parse_fn: Callable[[Any], SFTExample] | None = None,
    record_format: str = "auto",
    batch_size: int,
    max_length: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = False,
    pad_id: int | None = None,
    pad_to_multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
    on_bad_record: OnBadRecord = "raise",
    source_name: str = "source",
    num_threads: int = 1,
    prefetch_buffer_size: int = 256,
) -> BatchIterator:
    """Padded SFT batches: tokens/positions/segment_ids/loss_mask [B, L], example_mask [B].

    Arguments, stream, sharding, state and bad-record rules as `make_preference_iterator`
    (padded layout only). Records: {"prompt", "completion"} or any preference format (its
    chosen side, `formats.parse_sft`), or `SFTExample` / `TokenizedSequence` items.
    """
    return _make_iterator(
        "sft", layout="padded", num_rows=None, pack_buffer_size=None, ref_logps=None, **locals()
    )


def _make_iterator(kind: str, **kw) -> BatchIterator:
    """Shared body of the public constructors; `kw` holds their arguments by name."""
    parse_one, tokenize_one, example_type, item_type = _KINDS[kind]
    tokenizer, tokenize_config, parse_fn = kw["tokenizer"], kw["tokenize_config"], kw["parse_fn"]
    tokenize_fn = kw["tokenize_fn"]
    if tokenize_fn is None:
        if tokenizer is None or tokenize_config is None:
            raise ValueError("pass tokenize_fn, or tokenizer and tokenize_config")

        def tokenize_fn(example):
            return tokenize_one(example, tokenizer, tokenize_config)

    def parse(record, location):
        if isinstance(record, example_type):
            return record
        if parse_fn is not None:
            return parse_fn(record)
        fmt = kw["record_format"]
        return parse_one(record, format=fmt, tokenizer=tokenizer, location=location)

    max_length = kw["max_length"]
    if max_length is None:
        if tokenize_config is None:
            raise ValueError("pass max_length (or a tokenize_config, whose max_length is used)")
        max_length = tokenize_config.max_length
    elif tokenize_config is not None and tokenize_config.max_length > max_length:
        raise ValueError(
            f"tokenize_config.max_length={tokenize_config.max_length} > max_length="
            f"{max_length}: tokenized pairs might not fit the batch"
        )
    pad_id = kw["pad_id"]
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
    shard_index, shard_count = kw["shard_index"], kw["shard_count"]
    if shard_index is None or shard_count is None:
        import jax  # only when the caller leaves the shard to the JAX process layout

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    layout, batch_size = kw["layout"], int(kw["batch_size"])
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # Everything that shapes the stream or the batches; a restored state must match it.
    spec = {
        "kind": kind,
        "num_records": len(kw["source"]),
        "seed": int(kw["seed"]),
        "shuffle": bool(kw["shuffle"]),
        "num_epochs": None if kw["num_epochs"] is None else int(kw["num_epochs"]),
        "shard_index": int(shard_index),
        "shard_count": int(shard_count),
        "batch_size": batch_size,
        "max_length": int(max_length),
        "layout": layout,
        "drop_remainder": bool(kw["drop_remainder"]),
        "pad_id": int(pad_id),
    }
    if layout == "packed":
        num_rows = batch_size if kw["num_rows"] is None else int(kw["num_rows"])
        buffer = 2 * batch_size if kw["pack_buffer_size"] is None else int(kw["pack_buffer_size"])
        if buffer < 1:
            raise ValueError(f"pack_buffer_size must be >= 1, got {buffer}")
        spec.update(num_rows=num_rows, pack_buffer_size=buffer)

        def batch_fn(pairs, ref_logps):
            plan = batching.plan_packing(
                pairs, num_rows=num_rows, row_length=max_length, max_pairs=batch_size
            )
            batch = batching.packed_batch(pairs, plan, row_length=max_length,
                                          max_pairs=batch_size, pad_id=pad_id,
                                          ref_logps=ref_logps)  # fmt: skip
            return batch, plan.leftover

    else:
        pad = batching.pad_pairs if kind == "preference" else batching.pad_sequences
        buckets = None if kw["buckets"] is None else [int(b) for b in kw["buckets"]]
        multiple = kw["pad_to_multiple_of"]
        spec.update(pad_to_multiple_of=None if multiple is None else int(multiple), buckets=buckets)

        def batch_fn(items, ref_logps):
            extra = {} if ref_logps is None else {"ref_logps": ref_logps}
            return pad(
                items,
                max_length=max_length,
                pad_id=pad_id,
                pad_to_multiple_of=spec["pad_to_multiple_of"],
                buckets=buckets,
                batch_size=batch_size,
                **extra,
            )

    stream = shard_stream(
        spec["num_records"],
        seed=spec["seed"],
        shuffle=spec["shuffle"],
        num_epochs=spec["num_epochs"],
        shard_index=spec["shard_index"],
        shard_count=spec["shard_count"],
        drop_remainder=spec["drop_remainder"],
    )
    ref_logps = _check_ref_logps(kw["ref_logps"], spec["num_records"], kw["source_name"])
    prepare = _Prepare(kw["source"], parse, tokenize_fn, item_type, kw["source_name"], max_length)
    threads = kw["num_threads"]
    read_options = grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=kw["prefetch_buffer_size"] if threads else 0
    )
    return BatchIterator(
        stream.map(prepare),
        batch_fn,
        spec=spec,
        on_bad_record=kw["on_bad_record"],
        read_options=read_options,
        record_indices=stream,
        ref_logps=ref_logps,
    )


def _check_ref_logps(ref_logps, num_records: int, source_name: str) -> np.ndarray | None:
    """The cached reference sums as float32 [N, 2], or a clear error naming the record."""
    if ref_logps is None:
        return None
    ref = np.asarray(ref_logps)
    if ref.shape != (num_records, 2):
        raise ValueError(
            f"ref_logps has shape {ref.shape}; expected ({num_records}, 2): one (chosen, "
            f"rejected) row per record of {source_name}"
        )
    ref = ref.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(ref).all(axis=1))
    if bad.size:
        raise ValueError(
            f"ref_logps of {source_name}, record {int(bad[0])} is not finite: "
            f"{ref[bad[0]].tolist()} ({bad.size} such records)"
        )
    return ref
