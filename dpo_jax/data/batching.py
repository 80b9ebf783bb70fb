"""Static-shape numpy batches of tokenized pairs (padded or packed) and of SFT sequences.

Every array is int32 (ref_logps float32) and its shape comes from a small fixed set, so
the jitted train step compiles a handful of programs at most.

Padded preference batch, B pairs (axis P: 0 = chosen, 1 = rejected):
  tokens, positions, segment_ids, loss_mask: [B, 2, L]; pair_mask: [B];
  optional ref_logps: [B, 2] float32.
Packed preference batch, capacity B pairs in R rows of length L:
  tokens, positions, segment_ids, loss_mask, slot_ids: [R, L]; pair_mask: [B];
  optional ref_logps: [B, 2] float32.
Shared packed batch (prompt sharing, `dpo_jax.data.shared_prompts`): a packed batch in
  which each pair's prompt is held once, plus prefix_segment_ids: [R, L] (the segment whose
  earlier tokens a response also attends to; 0 = none).
SFT batch, B sequences: tokens, positions, segment_ids, loss_mask: [B, L];
  example_mask: [B].
Unpaired (KTO) batch, B examples: the padded preference layout with side 0 = the example
  (x_i, y_i) and side 1 = its KL sequence (x_i, y_{i-1}): the prompt with the completion of
  the previous example of the batch (cyclically), the mismatched pairs KTO estimates its KL
  baseline on (TRL's KTOTrainer rotates completions within a batch the same way);
  tokens, positions, segment_ids, loss_mask: [B, 2, L]; pair_mask: [B] (real examples);
  labels: [B] (1 = desirable, 0 = undesirable or padding).

Alignment (shared with dpo_jax.logprobs): loss_mask[t] = 1 marks token t as scored, its
log-prob being log p(tokens[t] | tokens[<t]). Only response tokens (incl. EOS) are scored,
so every sequence needs at least one prompt token (typically BOS) in front of its response:
a sequence's first token has no context and can never be scored.

Padding: tokens = pad_id, positions = 0, segment_ids = 0, loss_mask = 0, slot_ids = -1.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from dpo_jax.data.examples import TokenizedPair, TokenizedSequence, TokenizedUnpaired

SIDES = ("chosen", "rejected")

# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------


def allowed_lengths(
    max_length: int,
    *,
    pad_to_multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
) -> list[int]:
    """The sorted set of lengths L that padded batches may take (one jit shape each).

    No option: [max_length] (one shape). `pad_to_multiple_of=m`: m, 2m, ... below
    max_length, then max_length. `buckets`: the given boundaries plus max_length.
    """
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (one prompt + one response token), got {max_length}"
        )
    if pad_to_multiple_of is not None and buckets is not None:
        raise ValueError("pass either pad_to_multiple_of or buckets, not both")
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        return list(range(pad_to_multiple_of, max_length, pad_to_multiple_of)) + [max_length]
    if buckets is not None:
        bad = [b for b in buckets if not 1 <= b <= max_length]
        if bad:
            raise ValueError(
                f"bucket boundaries must lie in [1, max_length={max_length}], got {bad}"
            )
        return sorted(set(buckets) | {max_length})
    return [max_length]


def _padded_length(longest: int, lengths: list[int]) -> int:
    """Smallest allowed length >= longest (the caller checked longest <= lengths[-1])."""
    return lengths[bisect.bisect_left(lengths, longest)]


# ----------------------------------------------------------------------------------------
# Validation: bad pairs get an error naming the pair, never a shape error later
# ----------------------------------------------------------------------------------------


def _as_ids(ids, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be a flat list of integer token ids, got {ids!r}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what} has token ids outside [0, 2**31): {ids!r}")
    return arr.astype(np.int32)


def _check_prompt_response(prompt, response, where: str, response_name: str):
    prompt = _as_ids(prompt, f"{where}: prompt_ids")
    response = _as_ids(response, f"{where}: {response_name}")
    if prompt.size == 0:
        raise ValueError(
            f"{where}: prompt_ids is empty; a sequence's first token cannot be scored, so "
            "at least one prompt token (e.g. BOS) must precede the response"
        )
    if response.size == 0:
        raise ValueError(f"{where}: {response_name} is empty; there is nothing to score")
    return prompt, response


def _pair_sequences(pairs: Sequence[TokenizedPair]) -> list[tuple[tuple, tuple]]:
    """Per pair, per side: (prompt ids, response ids) as int32 arrays, validated."""
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, TokenizedPair):
            raise TypeError(f"pair {i}: expected TokenizedPair, got {type(pair).__name__}")
        out.append(
            tuple(
                _check_prompt_response(
                    pair.prompt_ids, getattr(pair, f"{side}_ids"), f"pair {i}", f"{side}_ids"
                )
                for side in SIDES
            )
        )
    return out


def check_ref_logps(ref_logps, num_items: int, source: str = "the batch") -> np.ndarray:
    """Cached reference sums as float32 [N, 2] (column 0 chosen, 1 rejected), or a clear
    error naming `source` and the first bad record (a wrong shape, a non-finite value)."""
    ref = np.asarray(ref_logps)
    if ref.shape != (num_items, 2):
        raise ValueError(
            f"ref_logps of {source} has shape {ref.shape}; expected ({num_items}, 2): one "
            "(chosen, rejected) row per pair"
        )
    ref = ref.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(ref).all(axis=1))
    if bad.size:
        raise ValueError(
            f"ref_logps of {source}, record {int(bad[0])} is not finite: "
            f"{ref[bad[0]].tolist()} ({bad.size} such records)"
        )
    return ref


def _fill_row(
    batch: dict, index, start: int, prompt: np.ndarray, response: np.ndarray, segment: int
):
    """Writes prompt + response at [*index, start:start + len] of every per-token array."""
    n_prompt, n = prompt.size, prompt.size + response.size
    where = (*index, slice(start, start + n))
    batch["tokens"][where] = np.concatenate([prompt, response])
    batch["positions"][where] = np.arange(n, dtype=np.int32)
    batch["segment_ids"][where] = segment
    batch["loss_mask"][(*index, slice(start + n_prompt, start + n))] = 1


def _empty_token_arrays(shape: tuple[int, ...], pad_id: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full(shape, pad_id, np.int32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
    }


def _check_batch_size(num_items: int, batch_size: int | None, what: str) -> int:
    if batch_size is None:
        if num_items == 0:
            raise ValueError(f"no {what} to batch (pass batch_size for an all-padding batch)")
        return num_items
    if num_items > batch_size:
        raise ValueError(f"got {num_items} {what} for batch_size={batch_size}")
    return batch_size


# ----------------------------------------------------------------------------------------
# Padded preference batches
# ----------------------------------------------------------------------------------------


def pad_pairs(
    pairs: Sequence[TokenizedPair],
    *,
    max_length: int,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
    batch_size: int | None = None,
    ref_logps=None,
) -> dict[str, np.ndarray]:
    """The padded preference batch (layout: module docstring) of `pairs`.

    B = batch_size (padding pairs, all zero with pair_mask 0, fill the rest) or len(pairs).
    L = the smallest of `allowed_lengths(max_length, ...)` holding the longest sequence.
    A sequence longer than max_length is an error naming the pair: truncation is the
    tokenizer's job, and silently cutting here would score a partial response.
    `ref_logps`: optional [len(pairs), 2] cached reference sums, copied to batch["ref_logps"].
    """
    lengths = allowed_lengths(max_length, pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)
    seqs = _pair_sequences(pairs)
    B = _check_batch_size(len(seqs), batch_size, "pairs")
    longest = 0
    for i, sides in enumerate(seqs):
        for side, (prompt, response) in zip(SIDES, sides, strict=True):
            n = prompt.size + response.size
            if n > max_length:
                raise ValueError(
                    f"pair {i}: {side} sequence has {n} tokens ({prompt.size} prompt + "
                    f"{response.size} response) > max_length={max_length}"
                )
            longest = max(longest, n)
    L = _padded_length(max(longest, 1), lengths)

    batch = _empty_token_arrays((B, 2, L), pad_id)
    for i, sides in enumerate(seqs):
        for p, (prompt, response) in enumerate(sides):
            _fill_row(batch, (i, p), 0, prompt, response, segment=1)
    batch["pair_mask"] = (np.arange(B) < len(seqs)).astype(np.int32)
    if ref_logps is not None:
        batch["ref_logps"] = np.zeros((B, 2), np.float32)
        batch["ref_logps"][: len(seqs)] = check_ref_logps(ref_logps, len(seqs))
    return batch


# ----------------------------------------------------------------------------------------
# Unpaired (KTO) batches
# ----------------------------------------------------------------------------------------


def kl_pairs(items: Sequence[TokenizedUnpaired], max_length: int) -> list[TokenizedPair]:
    """Each example with its KL completion, as a `TokenizedPair` (chosen = the example's
    completion, rejected = the previous item's, cyclically: TRL's
    `[completions[-1]] + completions[:-1]`). A KL sequence longer than `max_length` keeps
    its start, as TRL truncates it; the example's own prompt + completion always fit, so at
    least one KL completion token is left."""
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, TokenizedUnpaired):
            raise TypeError(f"example {i}: expected TokenizedUnpaired, got {type(item).__name__}")
        kl_completion = list(items[i - 1].completion_ids)[: max_length - len(item.prompt_ids)]
        pairs.append(TokenizedPair(list(item.prompt_ids), list(item.completion_ids), kl_completion))
    return pairs


def pad_unpaired(
    items: Sequence[TokenizedUnpaired],
    *,
    max_length: int,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """The padded unpaired batch (layout: module docstring) of `items`: `pad_pairs` of the
    examples with their KL sequences (`kl_pairs`), and their `labels`."""
    batch = pad_pairs(
        kl_pairs(items, max_length),
        max_length=max_length,
        pad_id=pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
        buckets=buckets,
        batch_size=batch_size,
    )
    batch["labels"] = np.zeros(batch["pair_mask"].shape, np.int32)
    batch["labels"][: len(items)] = [bool(item.label) for item in items]
    return batch


# ----------------------------------------------------------------------------------------
# Packed preference batches
# ----------------------------------------------------------------------------------------


class PackingPlan(NamedTuple):
    """Where each packed sequence goes.

    rows[r]: the (pair slot, side) of each segment of row r, in row order (segment ids
      1, 2, ... in that order). Pair slot b is the b-th packed pair.
    packed: input indices of the packed pairs, ascending; packed[b] is pair slot b.
    leftover: input indices of the pairs that did not fit, ascending.
    """

    rows: list[list[tuple[int, int]]]
    packed: list[int]
    leftover: list[int]


def plan_packing(
    pairs: Sequence[TokenizedPair], *, num_rows: int, row_length: int, max_pairs: int
) -> PackingPlan:
    """First-fit-decreasing placement of whole pairs into `num_rows` rows of `row_length`.

    The unit of packing is a sequence (prompt + one response), so a pair's two sequences
    may land in different rows, but a pair is packed whole or not at all. Pairs are
    visited in order of decreasing total length (ties: input order), each placing its
    longer sequence first into the first row with room, then the other one; a pair that
    does not fit, or exceeds max_pairs, is left over.

    Exception to the order: pairs[0] is placed first. It always fits into the empty rows
    (a pair that fits into no empty batch is an error, like an over-long sequence),
    so each call packs at least one pair, and a caller that puts the returned leftovers in
    front of new pairs never starves a pair (its position in the list only decreases).
    FFD rather than plain first-fit because the input is usually a buffer larger than one
    batch, and big-items-first leaves far less padding.
    """
    if num_rows < 1 or max_pairs < 1:
        raise ValueError(f"num_rows and max_pairs must be >= 1, got {num_rows}, {max_pairs}")
    if row_length < 2:
        raise ValueError(f"row_length must be >= 2, got {row_length}")
    seqs = _pair_sequences(pairs)
    sizes = []
    for i, sides in enumerate(seqs):
        pair_sizes = [prompt.size + response.size for prompt, response in sides]
        for side, n in zip(SIDES, pair_sizes, strict=True):
            if n > row_length:
                raise ValueError(
                    f"pair {i}: {side} sequence has {n} tokens > row_length={row_length}; "
                    "it fits in no row (truncate it when tokenizing or raise row_length)"
                )
        if num_rows == 1 and sum(pair_sizes) > row_length:
            # It would never fit, not even into an empty batch: an error, not an endless leftover.
            raise ValueError(
                f"pair {i}: chosen + rejected sequences have {sum(pair_sizes)} tokens > "
                f"row_length={row_length}, and with num_rows=1 both must share the row"
            )
        sizes.append(pair_sizes)

    order = sorted(range(1, len(seqs)), key=lambda i: -sum(sizes[i]))
    if seqs:
        order.insert(0, 0)
    free = [row_length] * num_rows
    placement: dict[int, list[int]] = {}  # pair index -> row of [chosen, rejected]
    for i in order:
        if len(placement) == max_pairs:
            break
        rows = [-1, -1]
        for side in sorted((0, 1), key=lambda p: -sizes[i][p]):
            row = next((r for r in range(num_rows) if free[r] >= sizes[i][side]), -1)
            if row < 0:
                break
            free[row] -= sizes[i][side]
            rows[side] = row
        else:
            placement[i] = rows
            continue
        for side, row in enumerate(rows):  # undo the half-placed pair
            if row >= 0:
                free[row] += sizes[i][side]

    packed = sorted(placement)
    plan_rows: list[list[tuple[int, int]]] = [[] for _ in range(num_rows)]
    for slot, i in enumerate(packed):
        for side, row in enumerate(placement[i]):
            plan_rows[row].append((slot, side))
    leftover = [i for i in range(len(seqs)) if i not in placement]
    return PackingPlan(rows=plan_rows, packed=packed, leftover=leftover)


def packed_batch(
    pairs: Sequence[TokenizedPair],
    plan: PackingPlan,
    *,
    row_length: int,
    max_pairs: int,
    pad_id: int = 0,
    ref_logps=None,
) -> dict[str, np.ndarray]:
    """Builds the packed batch (layout: module docstring; B = max_pairs) that `plan` describes.

    `ref_logps`: optional [len(pairs), 2] cached reference sums aligned with `pairs`;
    batch["ref_logps"][b] = ref_logps[plan.packed[b]], zeros for empty pair slots.
    """
    seqs = _pair_sequences(pairs)
    batch = _empty_token_arrays((len(plan.rows), row_length), pad_id)
    batch["slot_ids"] = np.full((len(plan.rows), row_length), -1, np.int32)
    for r, segments in enumerate(plan.rows):
        start = 0
        for segment, (slot, side) in enumerate(segments, start=1):
            prompt, response = seqs[plan.packed[slot]][side]
            n = prompt.size + response.size
            if start + n > row_length:
                raise ValueError(f"packing plan overfills row {r} (length {row_length})")
            _fill_row(batch, (r,), start, prompt, response, segment)
            batch["slot_ids"][r, start : start + n] = 2 * slot + side
            start += n
    if len(plan.packed) > max_pairs:
        raise ValueError(f"packing plan holds {len(plan.packed)} pairs > max_pairs={max_pairs}")
    add_pair_slots(batch, plan.packed, max_pairs, ref_logps, len(seqs))
    return batch


def add_pair_slots(batch: dict, packed: list[int], max_pairs: int, ref_logps, num_pairs: int):
    """The per-pair fields of a packed batch whose slot b holds input pair packed[b]:
    pair_mask [max_pairs], and with `ref_logps` ([num_pairs, 2] aligned with the input
    pairs) batch["ref_logps"][b] = ref_logps[packed[b]], zeros for empty slots."""
    batch["pair_mask"] = (np.arange(max_pairs) < len(packed)).astype(np.int32)
    if ref_logps is not None:
        ref = check_ref_logps(ref_logps, num_pairs)
        batch["ref_logps"] = np.zeros((max_pairs, 2), np.float32)
        batch["ref_logps"][: len(packed)] = ref[packed]


# ----------------------------------------------------------------------------------------
# SFT batches
# ----------------------------------------------------------------------------------------


def pad_sequences(
    seqs: Sequence[TokenizedSequence],
    *,
    max_length: int,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """The padded SFT batch (layout: module docstring) of `seqs`.

    loss_mask is 1 on completion tokens (incl. EOS). B and L follow the rules of `pad_pairs`.
    """
    lengths = allowed_lengths(max_length, pad_to_multiple_of=pad_to_multiple_of, buckets=buckets)
    checked = []
    for i, seq in enumerate(seqs):
        if not isinstance(seq, TokenizedSequence):
            raise TypeError(f"sequence {i}: expected TokenizedSequence, got {type(seq).__name__}")
        prompt, completion = _check_prompt_response(
            seq.prompt_ids, seq.completion_ids, f"sequence {i}", "completion_ids"
        )
        if prompt.size + completion.size > max_length:
            raise ValueError(
                f"sequence {i}: {prompt.size + completion.size} tokens ({prompt.size} prompt + "
                f"{completion.size} completion) > max_length={max_length}"
            )
        checked.append((prompt, completion))
    B = _check_batch_size(len(checked), batch_size, "sequences")
    longest = max((p.size + c.size for p, c in checked), default=1)
    L = _padded_length(longest, lengths)
    batch = _empty_token_arrays((B, L), pad_id)
    for i, (prompt, completion) in enumerate(checked):
        _fill_row(batch, (i,), 0, prompt, completion, segment=1)
    batch["example_mask"] = (np.arange(B) < len(checked)).astype(np.int32)
    return batch


# ----------------------------------------------------------------------------------------
# The batch schema (checked on shapes and field names only, so that it works on numpy
# arrays, jax arrays and tracers alike: the train steps call it at trace time)
# ----------------------------------------------------------------------------------------

ROW_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")
# Per-token fields of packed batches only: split along R like ROW_FIELDS.
PACKED_ROW_FIELDS = ("slot_ids", "prefix_segment_ids")


def is_packed(batch) -> bool:
    """A packed preference batch carries `slot_ids`; a padded one does not."""
    return "slot_ids" in batch


def _check_fields(batch, fields, what: str) -> None:
    missing = [f for f in fields if f not in batch]
    if missing:
        raise ValueError(f"{what}: batch lacks field(s) {missing}; it has {sorted(batch)}")


def check_preference_batch(batch) -> None:
    """Raises a ValueError naming the field when a preference batch is malformed."""
    packed = is_packed(batch)
    _check_fields(batch, (*ROW_FIELDS, "pair_mask"), "preference batch")
    shape = tuple(batch["tokens"].shape)
    want = "[R, L]" if packed else "[B, 2, L]"
    if (packed and len(shape) != 2) or (not packed and (len(shape) != 3 or shape[1] != 2)):
        raise ValueError(f"preference batch: field 'tokens' has shape {shape}, expected {want}")
    if "prefix_segment_ids" in batch and not packed:
        raise ValueError(
            "preference batch: field 'prefix_segment_ids' (prompt sharing) needs the packed "
            "layout (with 'slot_ids')"
        )
    extra = [f for f in PACKED_ROW_FIELDS if f in batch]
    for f in (*ROW_FIELDS[1:], *extra):
        if tuple(batch[f].shape) != shape:
            raise ValueError(
                f"preference batch: field {f!r} has shape {tuple(batch[f].shape)}, expected "
                f"{shape} like 'tokens'"
            )
    num_pairs = batch["pair_mask"].shape
    if len(num_pairs) != 1 or (not packed and num_pairs[0] != shape[0]):
        raise ValueError(
            f"preference batch: field 'pair_mask' has shape {num_pairs}, expected "
            f"{'[B]' if packed else f'[{shape[0]}]'}"
        )
    if "ref_logps" in batch and tuple(batch["ref_logps"].shape) != (num_pairs[0], 2):
        raise ValueError(
            f"preference batch: field 'ref_logps' has shape {tuple(batch['ref_logps'].shape)}, "
            f"expected [B, 2] = {(num_pairs[0], 2)}"
        )


def check_unpaired_batch(batch) -> None:
    """Raises a ValueError naming the field when an unpaired (KTO) batch is malformed."""
    if is_packed(batch):
        raise ValueError("unpaired batch: packed layout is not supported; use the padded one")
    check_preference_batch(batch)
    _check_fields(batch, ("labels",), "unpaired batch")
    if tuple(batch["labels"].shape) != tuple(batch["pair_mask"].shape):
        raise ValueError(
            f"unpaired batch: field 'labels' has shape {tuple(batch['labels'].shape)}, "
            f"expected [B] = {tuple(batch['pair_mask'].shape)}"
        )


def check_sft_batch(batch) -> None:
    """Raises a ValueError naming the field when an SFT batch (example_mask optional) is
    malformed."""
    _check_fields(batch, ROW_FIELDS, "SFT batch")
    shape = tuple(batch["tokens"].shape)
    if len(shape) != 2:
        raise ValueError(f"SFT batch: field 'tokens' has shape {shape}, expected [B, L]")
    for f in ROW_FIELDS[1:]:
        if tuple(batch[f].shape) != shape:
            raise ValueError(
                f"SFT batch: field {f!r} has shape {tuple(batch[f].shape)}, expected {shape}"
            )
    if "example_mask" in batch and tuple(batch["example_mask"].shape) != shape[:1]:
        raise ValueError(
            f"SFT batch: field 'example_mask' has shape {tuple(batch['example_mask'].shape)}, "
            f"expected {shape[:1]}"
        )


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def padding_fraction(batch: dict) -> float:
    """Fraction of token slots that are padding (segment id 0), padding pairs included."""
    segment_ids = batch["segment_ids"]
    return float(np.mean(segment_ids == 0)) if segment_ids.size else 0.0
