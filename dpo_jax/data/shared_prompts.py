"""Packed preference batches with prompt sharing: one row holds a pair's prompt once and
both of its responses (layout "packed_shared").

A pair (prompt of T tokens, chosen, rejected) becomes three segments of one row:

    segment s     prompt[:-1]                 positions 0 .. T-2        prefix 0
    segment s+1   [prompt[-1]] + chosen       positions T-1, T, ...     prefix s
    segment s+2   [prompt[-1]] + rejected     positions T-1, T, ...     prefix s

Each branch reads its own segment causally and, through `prefix_segment_ids`, the earlier
tokens of segment s (the mask rule of `dpo_jax.models.attention`); the rejected branch
never sees the chosen one. So every token has exactly the context and the position it has
in the unshared sequence prompt + response, and the alignment convention of
`dpo_jax.logprobs` (entry t is predicted from logits t-1) holds inside each branch: the
first response token is predicted from that branch's copy of the last prompt token. The
copy costs one token per pair; the prompt's other T-1 tokens are computed once instead of
twice. A one-token prompt (e.g. BOS alone) leaves segment s empty: then the two branches
are plain segments with no prefix.

The batch is a packed preference batch (`dpo_jax.data.batching`: tokens, positions,
segment_ids, loss_mask, slot_ids [R, L]; pair_mask [B]; optional ref_logps [B, 2]) plus

    prefix_segment_ids: [R, L] int32, s on both branches of a pair, 0 elsewhere;

so `logprobs.pair_sums` over slot_ids scores it unchanged. slot_ids is 2 b + side on a
branch (its copy of the last prompt token included, never scored) and -1 on the shared
prompt tokens, which belong to both sides and are never scored.

Rows are filled with whole pairs (a pair never straddles rows), first-fit decreasing as
`batching.plan_packing`. A pair needs T + 1 + |chosen| + |rejected| tokens: at most
2 * max_length when each of its sequences has at most max_length tokens (T >= 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from dpo_jax.data.batching import _empty_token_arrays, _pair_sequences, add_pair_slots
from dpo_jax.data.examples import TokenizedPair


class SharedPlan(NamedTuple):
    """Where each pair goes.

    rows[r]: the pair slots of row r, in row order (slot b is the b-th packed pair).
    packed: input indices of the packed pairs, ascending; packed[b] is pair slot b.
    leftover: input indices of the pairs that did not fit, ascending.
    """

    rows: list[list[int]]
    packed: list[int]
    leftover: list[int]


def shared_size(prompt_length: int, chosen_length: int, rejected_length: int) -> int:
    """Tokens a pair takes in the shared layout: the prompt once, its last token once more."""
    return prompt_length + 1 + chosen_length + rejected_length


def plan_shared_packing(
    pairs: Sequence[TokenizedPair], *, num_rows: int, row_length: int, max_pairs: int
) -> SharedPlan:
    """First-fit-decreasing placement of whole shared pairs into `num_rows` rows.

    Pairs are visited in order of decreasing `shared_size` (ties: input order), except
    pairs[0], placed first: it always fits into the empty rows (a pair that fits into no
    row is an error naming it), so every call packs at least one pair and leftovers put in
    front of new pairs are never starved (as `batching.plan_packing`). A pair that does not
    fit, or exceeds max_pairs, is left over.
    """
    if num_rows < 1 or max_pairs < 1:
        raise ValueError(f"num_rows and max_pairs must be >= 1, got {num_rows}, {max_pairs}")
    seqs = _pair_sequences(pairs)
    sizes = []
    for i, ((prompt, chosen), (_, rejected)) in enumerate(seqs):
        n = shared_size(prompt.size, chosen.size, rejected.size)
        if n > row_length:
            raise ValueError(
                f"pair {i}: {prompt.size} prompt + 1 + {chosen.size} chosen + "
                f"{rejected.size} rejected tokens = {n} > row_length={row_length}; the "
                "shared layout holds a whole pair in one row (rows of 2 * max_length fit any)"
            )
        sizes.append(n)
    order = sorted(range(1, len(seqs)), key=lambda i: -sizes[i])
    if seqs:
        order.insert(0, 0)
    free = [row_length] * num_rows
    placement: dict[int, int] = {}  # pair index -> row
    for i in order:
        if len(placement) == max_pairs:
            break
        row = next((r for r in range(num_rows) if free[r] >= sizes[i]), -1)
        if row >= 0:
            free[row] -= sizes[i]
            placement[i] = row
    packed = sorted(placement)
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    for slot, i in enumerate(packed):
        rows[placement[i]].append(slot)
    leftover = [i for i in range(len(seqs)) if i not in placement]
    return SharedPlan(rows=rows, packed=packed, leftover=leftover)


def shared_batch(
    pairs: Sequence[TokenizedPair],
    plan: SharedPlan,
    *,
    row_length: int,
    max_pairs: int,
    pad_id: int = 0,
    ref_logps=None,
) -> dict[str, np.ndarray]:
    """The shared packed batch (module docstring; R = len(plan.rows), B = max_pairs) that
    `plan` describes. `ref_logps`: optional [len(pairs), 2] cached reference sums aligned
    with `pairs`; batch["ref_logps"][b] = ref_logps[plan.packed[b]], zeros for empty slots.
    """
    if len(plan.packed) > max_pairs:
        raise ValueError(f"packing plan holds {len(plan.packed)} pairs > max_pairs={max_pairs}")
    seqs = _pair_sequences(pairs)
    shape = (len(plan.rows), row_length)
    batch = _empty_token_arrays(shape, pad_id)
    batch["slot_ids"] = np.full(shape, -1, np.int32)
    batch["prefix_segment_ids"] = np.zeros(shape, np.int32)
    for r, slots in enumerate(plan.rows):
        start, segment = 0, 0
        for slot in slots:
            (prompt, chosen), (_, rejected) = seqs[plan.packed[slot]]
            T = prompt.size
            if start + shared_size(T, chosen.size, rejected.size) > row_length:
                raise ValueError(f"packing plan overfills row {r} (length {row_length})")
            prefix = 0
            if T > 1:  # a one-token prompt has nothing to share but its copies
                segment += 1
                prefix = segment
                where = (r, slice(start, start + T - 1))
                batch["tokens"][where] = prompt[:-1]
                batch["positions"][where] = np.arange(T - 1, dtype=np.int32)
                batch["segment_ids"][where] = segment
                start += T - 1
            for side, response in enumerate((chosen, rejected)):
                segment += 1
                n = 1 + response.size
                where = (r, slice(start, start + n))
                batch["tokens"][where] = np.concatenate([prompt[-1:], response])
                batch["positions"][where] = np.arange(T - 1, T - 1 + n, dtype=np.int32)
                batch["segment_ids"][where] = segment
                batch["prefix_segment_ids"][where] = prefix
                batch["slot_ids"][where] = 2 * slot + side
                batch["loss_mask"][r, start + 1 : start + n] = 1
                start += n
    add_pair_slots(batch, plan.packed, max_pairs, ref_logps, len(seqs))
    return batch
