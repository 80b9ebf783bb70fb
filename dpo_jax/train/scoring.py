"""Scoring sequences: batch checks, the policy/reference forward, per-pair log-probs.

A preference batch is padded (`tokens, positions, segment_ids, loss_mask: [B, 2, L]`) or
packed (the same fields plus `slot_ids`, `[R, L]`), with `pair_mask: [B]` and optionally
cached `ref_logps: [B, 2]` (see `dpo_jax.data.batching`). Either way the model sees ONE
forward over all sequences: padded `[B, 2, L]` is viewed as `[2B, L]` (row 2b + side, so a
pair's two rows stay on the same batch shard); packed rows are used as they are and
`slot_ids` map tokens to pair slots (`logprobs.pair_sums`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dpo_jax import logprobs

Batch = Mapping[str, jax.Array]
ROW_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")

# ------------------------------------------------------------------------------------------
# Batch checks (trace time: shapes and field names only)
# ------------------------------------------------------------------------------------------


def is_packed(batch: Batch) -> bool:
    return "slot_ids" in batch


def _check_fields(batch: Batch, fields, what: str) -> None:
    missing = [f for f in fields if f not in batch]
    if missing:
        raise ValueError(f"{what}: batch lacks field(s) {missing}; it has {sorted(batch)}")


def check_preference_batch(batch: Batch) -> None:
    """Raises a ValueError naming the field when a preference batch is malformed."""
    packed = is_packed(batch)
    _check_fields(batch, (*ROW_FIELDS, "pair_mask"), "preference batch")
    shape = tuple(batch["tokens"].shape)
    want = "[R, L]" if packed else "[B, 2, L]"
    if (packed and len(shape) != 2) or (not packed and (len(shape) != 3 or shape[1] != 2)):
        raise ValueError(f"preference batch: field 'tokens' has shape {shape}, expected {want}")
    for f in (*ROW_FIELDS[1:], *(("slot_ids",) if packed else ())):
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


def split_micro_batches(batch: Batch, accum_steps: int, packed: bool) -> tuple[dict, dict]:
    """Splits the micro-batched fields into [A, ...] (returned first) from the global ones.

    Padded: every field is split along B. Packed: row fields along R; `pair_mask` and
    `ref_logps` ([B] pair slots, shared by all rows) stay whole.
    """
    split_fields = (*ROW_FIELDS, "slot_ids") if packed else tuple(batch)
    lead_name = "R (rows)" if packed else "B (pairs)"
    micro, whole = {}, {}
    for name, x in batch.items():
        if name not in split_fields:
            whole[name] = x
            continue
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"accum_steps={accum_steps} must divide the batch's {lead_name} = {x.shape[0]} "
                f"(field {name!r})"
            )
        micro[name] = x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    return micro, whole


# ------------------------------------------------------------------------------------------
# Forward passes: per-token and per-pair log-probs
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How sequences are scored (static).

    model: linen module, `model.apply({"params": p}, tokens, positions=, segment_ids=)`.
    memory_efficient: log-probs from hidden states (`method="features"`) with
      `logprobs.token_logps_from_features`, never materialising [N, L, V] float32.
    chunk_size / vocab_chunk_size: chunking of the memory-efficient path.
    """

    model: Any
    memory_efficient: bool = False
    chunk_size: int = 256
    vocab_chunk_size: int | None = None

    def token_logps(self, params, tokens, positions, segment_ids, rngs=None, sum_sq=False):
        """[N, L] rows -> token log-probs [N, L] float32 (and log sum_v p(v)^2 [N, L])."""
        variables = {"params": params}
        kwargs = dict(positions=positions, segment_ids=segment_ids)
        if rngs is not None:
            kwargs["rngs"] = rngs
        if self.memory_efficient:
            if sum_sq:
                raise ValueError(
                    "memory_efficient log-probs give no full next-token distribution, which "
                    "this loss needs (log_sum_sq_probs, WPO alignment); disable one of them"
                )
            hidden, unembed = self.model.apply(variables, tokens, method="features", **kwargs)
            return logprobs.token_logps_from_features(
                hidden, unembed, tokens, chunk_size=self.chunk_size,
                vocab_chunk_size=self.vocab_chunk_size,
            ), None  # fmt: skip
        logits = self.model.apply(variables, tokens, **kwargs)
        token_logps = logprobs.token_logps(logits, tokens)
        if not sum_sq:
            return token_logps, None
        # log sum_v p(v)^2 of the distribution that predicts token t (entry t, entry 0 = 0).
        logits = logits[..., :-1, :].astype(jnp.float32)
        lss = jax.nn.logsumexp(2.0 * logits, -1) - 2.0 * jax.nn.logsumexp(logits, -1)
        return token_logps, jnp.pad(lss, [(0, 0), (1, 0)])

    def pair_stats(self, params, batch, num_pairs, *, per_token=False, sum_sq=False, rngs=None):
        """Per-pair log-prob sums `logps: [B, 2]` (0 = chosen) from one forward.

        Padded batches also give `token_logps` (and `log_sum_sq`) `[B, 2, L]` on request.
        """
        tokens = batch["tokens"]
        if is_packed(batch):
            rows = [batch[f] for f in ("tokens", "positions", "segment_ids")]
        else:
            rows = [batch[f].reshape(-1, tokens.shape[-1]) for f in ROW_FIELDS[:3]]
        token_logps, lss = self.token_logps(params, *rows, rngs=rngs, sum_sq=sum_sq)
        if is_packed(batch):
            logps = logprobs.pair_sums(
                token_logps, batch["slot_ids"], num_pairs, batch["loss_mask"]
            )
            return {"logps": logps}
        token_logps = token_logps.reshape(tokens.shape)
        stats = {"logps": logprobs.masked_sum(token_logps, batch["loss_mask"])}
        if per_token:
            stats["token_logps"] = token_logps
        if sum_sq:
            stats["log_sum_sq"] = lss.reshape(tokens.shape)
        return stats


def pair_lengths(batch: Batch) -> jax.Array:
    """Scored tokens per pair and side: [B, 2] float32."""
    if is_packed(batch):
        mask = batch["loss_mask"]
        return logprobs.pair_sums(jnp.ones(mask.shape), batch["slot_ids"],
                                  batch["pair_mask"].shape[0], mask)  # fmt: skip
    return logprobs.token_counts(batch["loss_mask"])


def reference_logps(
    params,
    batch: Batch,
    *,
    model,
    memory_efficient: bool = False,
    chunk_size: int = 256,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """Per-pair log-prob sums `[B, 2]` float32 (0 = chosen) of `params` on a preference batch.

    Used to precompute `batch["ref_logps"]` for a dataset (cached reference), and to score
    any model on pairs. Padded or packed batch; one forward. Jit it with `functools.partial`
    binding `model` (and the options).
    """
    check_preference_batch(batch)
    scoring = Scoring(model, memory_efficient, chunk_size, vocab_chunk_size)
    stats = scoring.pair_stats(params, batch, batch["pair_mask"].shape[0])
    return jnp.where(batch["pair_mask"][:, None] != 0, stats["logps"], 0.0)


# ------------------------------------------------------------------------------------------
# SFT batches
# ------------------------------------------------------------------------------------------


def check_sft_batch(batch: Batch) -> None:
    """SFT batch: tokens, positions, segment_ids, loss_mask [B, L]; optional example_mask [B]."""
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


def sft_mask(batch: Batch) -> jax.Array:
    mask = batch["loss_mask"] != 0
    if "example_mask" in batch:
        mask = mask & (batch["example_mask"][:, None] != 0)
    return mask
