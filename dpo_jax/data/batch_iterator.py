"""`BatchIterator`: static-shape batches from a grain stream, with an exact JSON state.

The pipeline (`dpo_jax.data.pipeline`) builds the stream (shuffle, epochs, shard) and
hands it here; this module turns stream items into batches and owns the iterator state:
the next stream position plus the positions of pairs that packing holds back. Stream
items are tokenized pairs/sequences or `EMPTY` (a position past the data that keeps
processes in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

STATE_VERSION = 1


class EmptySlot:
    """A stream position past the data, added so that all processes yield equally many."""

    def __repr__(self) -> str:
        return "<empty slot>"


EMPTY = EmptySlot()


class BatchIterator:
    """Iterator of static-shape numpy batches with an exact, JSON-serializable state.

    `get_state()` -> dict (JSON types only); `set_state(state)` on an iterator built with the
    same arguments continues with exactly the batches that followed `get_state()`. The
    state also carries the arguments that define the stream (`spec`) and refuses a
    mismatch.
    """

    def __init__(
        self,
        items: grain.MapDataset,
        batch_fn: Callable,
        *,
        spec: dict,
        record_indices: grain.MapDataset | None = None,
        ref_logps: np.ndarray | None = None,
    ):
        """items: this process's stream of tokenized items (or `EMPTY`).

        batch_fn: padded: (items, ref_logps or None) -> batch; packed: (pairs, ref_logps or
          None) -> (batch, leftover indices).
        spec: the arguments that define the stream and batches
          (`pipeline.IteratorSpec.state_spec`).
        record_indices, ref_logps: the stream of source indices that `items` maps, and the
          cached reference sums [N, 2] per source record (both or neither).
        """
        self._items = items
        self._batch_fn = batch_fn
        self._record_indices = record_indices
        self._ref_logps = ref_logps
        self.spec = dict(spec)
        # No worker threads: items are already tokenized, so a map stage is a list lookup.
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iter = items.to_iter_dataset(read_options).__iter__()
        if self._iter.get_state() != {"next_index": 0}:
            # Restoring relies on grain's MapDataset iterator state being the next index.
            raise RuntimeError(f"unexpected grain iterator state {self._iter.get_state()!r}")
        self._next_index = 0
        self._buffer: list[tuple[int, Any]] = []  # (stream position, pair) held by packing

    def __iter__(self) -> BatchIterator:
        return self

    def _pull(self) -> tuple[int, Any] | None:
        """Next (position, item), None at the end of the stream."""
        if self._next_index >= len(self._items):
            return None
        item = next(self._iter)
        position = self._next_index
        self._next_index += 1
        return position, item

    def _ref_rows(self, positions: list[int]) -> np.ndarray | None:
        """Cached reference sums [len(positions), 2] of the records at these positions."""
        if self._ref_logps is None:
            return None
        records = [int(self._record_indices[p]) for p in positions]
        return self._ref_logps[records].reshape(len(positions), 2)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.spec["layout"] in ("packed", "packed_shared"):  # a buffer to pack from
            return self._next_packed()
        pulled_items, slots, batch_size = [], 0, self.spec["batch_size"]
        while slots < batch_size:
            pulled = self._pull()
            if pulled is None:
                break
            slots += 1
            if not isinstance(pulled[1], EmptySlot):
                pulled_items.append(pulled)
        if slots == 0 or (slots < batch_size and self.spec["drop_remainder"]):
            raise StopIteration
        items = [item for _, item in pulled_items]
        return self._batch_fn(items, self._ref_rows([p for p, _ in pulled_items]))

    def _next_packed(self) -> dict[str, np.ndarray]:
        ended = False
        while len(self._buffer) < self.spec["pack_buffer_size"]:
            pulled = self._pull()
            if pulled is None:
                ended = True
                break
            if not isinstance(pulled[1], EmptySlot):
                self._buffer.append(pulled)
        if ended and self.spec["drop_remainder"]:
            self._buffer = []  # the documented loss: pairs still buffered at the end
        if not self._buffer:
            raise StopIteration
        batch, leftover = self._batch_fn(
            [pair for _, pair in self._buffer], self._ref_rows([p for p, _ in self._buffer])
        )
        self._buffer = [self._buffer[i] for i in leftover]
        return batch

    def get_state(self) -> dict:
        """JSON-serializable state: resume with `set_state` on an identically built iterator."""
        return {
            "version": STATE_VERSION,
            "spec": dict(self.spec),
            "next_index": self._next_index,
            "pending": [position for position, _ in self._buffer],
        }

    def set_state(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')!r} != {STATE_VERSION}")
        if dict(state["spec"]) != self.spec:
            diff = {
                k: (state["spec"].get(k), self.spec.get(k))
                for k in sorted(set(state["spec"]) | set(self.spec))
                if state["spec"].get(k) != self.spec.get(k)
            }
            raise ValueError(
                "the iterator state was saved for a different pipeline; (saved, now) per "
                f"differing argument: {diff}"
            )
        next_index = int(state["next_index"])
        if not 0 <= next_index <= len(self._items):
            raise ValueError(f"state next_index {next_index} outside [0, {len(self._items)}]")
        self._iter.set_state({"next_index": next_index})
        self._next_index = next_index
        # Pending pairs are re-made from their positions: every stage is a pure function
        # of the position, so they come back identical.
        self._buffer = [(int(p), self._items[int(p)]) for p in state["pending"]]
        # States saved before records were parsed up front also hold "bad_records" (always
        # empty for tokenized items); it is ignored.

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()
