"""Scoring sequences: the forward pass and the per-token and per-pair log-probs it gives.

Batches follow the schema of `dpo_jax.data.batching` (padded `[B, 2, L]` or packed
`[R, L]`). Either way the model sees ONE forward over all sequences: padded `[B, 2, L]` is
viewed as `[2B, L]` (row 2b + side, so a pair's two rows stay on the same batch shard);
packed rows are used as they are and `slot_ids` map tokens to pair slots
(`logprobs.pair_sums`); shared packed rows (prompt sharing) also pass their
`prefix_segment_ids` to the model. The same code scores the policy (with gradients), the frozen
reference, and any params a caller wants to rank pairs with (`pair_logps`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dpo_jax import logprobs
from dpo_jax.data.batching import ROW_FIELDS, check_preference_batch, is_packed


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
    """How log-probs are computed (static; the same for policy and reference).

    memory_efficient: from hidden states (`method="features"`) with
      `logprobs.token_logps_from_features`, never materialising `[N, L, V]` float32 logits.
    chunk_size: sequence positions per chunk of the memory-efficient path.
    vocab_chunk_size: vocabulary columns per block of the memory-efficient path (None =
      the whole vocabulary at once, which needs float32 `[D, V]` buffers in the backward
      pass; see experiments/logprobs_memory for the measured difference).
    scored_only: the memory-efficient path runs the `[D, V]` head and log-softmax only at
      positions whose next token is scored (`loss_mask`), skipping chunks of `chunk_size`
      positions that hold none (see `logprobs.token_logps_from_features`). Exact; the
      per-token log-probs it gives are 0 at unscored entries, which no loss reads.
    scored_row_groups: scored_only, balanced: the scored positions of each of this many
      contiguous groups of rows are spread evenly over the group's rows, so the head's cost
      follows their mean count rather than the fullest row's. They move across rows: under a
      batch-sharded jit use the number of batch shards (or None); 1 on one device.
      None = every row keeps its own positions.
    keep_logits: the memory-efficient path keeps each chunk's float32 logits for the
      backward pass instead of recomputing them (one head matmul fewer per differentiated
      forward, float32 [scored positions, V] more memory; `logprobs.token_logps_from_features`).
    """

    memory_efficient: bool = False
    chunk_size: int = 256
    vocab_chunk_size: int | None = 8192
    scored_only: bool = True
    scored_row_groups: int | None = None
    keep_logits: bool = False

    @classmethod
    def from_config(cls, stage_config) -> ScoringOptions:
        """From a stage config's `memory_efficient_logps`, `logps_chunk_size`,
        `logps_vocab_chunk_size` (0 = the whole vocabulary), `logps_scored_only`,
        `logps_scored_row_groups` (0 = None), `logps_keep_logits`."""
        if int(stage_config.logps_scored_row_groups) < 0:
            raise ValueError(
                f"logps_scored_row_groups must be >= 0 (0 = each row alone), got "
                f"{stage_config.logps_scored_row_groups}"
            )
        return cls(
            memory_efficient=bool(stage_config.memory_efficient_logps),
            chunk_size=int(stage_config.logps_chunk_size),
            vocab_chunk_size=int(stage_config.logps_vocab_chunk_size) or None,
            scored_only=bool(stage_config.logps_scored_only),
            scored_row_groups=int(stage_config.logps_scored_row_groups) or None,
            keep_logits=bool(stage_config.logps_keep_logits),
        )


DEFAULT_SCORING = ScoringOptions()


@dataclasses.dataclass(frozen=True)
class Scoring:
    """A model bound to its `ScoringOptions` (static).

    model: linen module, `model.apply({"params": p}, tokens, positions=, segment_ids=)`
      (and `prefix_segment_ids=` for shared packed batches).
    """

    model: Any
    options: ScoringOptions = DEFAULT_SCORING

    def token_logps(
        self,
        params,
        tokens,
        positions,
        segment_ids,
        rngs=None,
        sum_sq=False,
        prefix_segment_ids=None,
        loss_mask=None,
    ):
        """[N, L] rows -> token log-probs [N, L] float32 (and log sum_v p(v)^2 [N, L]).
        prefix_segment_ids: [N, L] of a shared packed batch, or None.
        loss_mask: [N, L] or None; with `options.scored_only` (memory-efficient path) the
        head runs only where the next token is scored, and entries where it is 0 are 0."""
        variables = {"params": params}
        kwargs = dict(positions=positions, segment_ids=segment_ids)
        if prefix_segment_ids is not None:  # only then: models without sharing keep working
            kwargs["prefix_segment_ids"] = prefix_segment_ids
        if rngs is not None:
            kwargs["rngs"] = rngs
        opts = self.options
        if opts.memory_efficient:
            if sum_sq:
                raise ValueError(
                    "memory_efficient log-probs give no full next-token distribution, which "
                    "this loss needs (log_sum_sq_probs, WPO alignment); disable one of them"
                )
            hidden, unembed = self.model.apply(variables, tokens, method="features", **kwargs)
            token_logps = logprobs.token_logps_from_features(
                hidden,
                unembed,
                tokens,
                loss_mask=loss_mask if opts.scored_only else None,
                row_groups=opts.scored_row_groups,
                chunk_size=opts.chunk_size,
                vocab_chunk_size=opts.vocab_chunk_size,
                keep_logits=opts.keep_logits,
            )
            return token_logps, None
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
        packed = is_packed(batch)
        if packed:
            rows = [batch[f] for f in ROW_FIELDS[:3]]
        else:
            rows = [batch[f].reshape(-1, tokens.shape[-1]) for f in ROW_FIELDS[:3]]
        token_logps, lss = self.token_logps(
            params,
            *rows,
            rngs=rngs,
            sum_sq=sum_sq,
            prefix_segment_ids=batch.get("prefix_segment_ids") if packed else None,
            loss_mask=batch["loss_mask"].reshape(rows[0].shape),
        )
        if packed:
            slots, mask = batch["slot_ids"], batch["loss_mask"]
            return {"logps": logprobs.pair_sums(token_logps, slots, num_pairs, mask)}
        token_logps = token_logps.reshape(tokens.shape)
        stats = {"logps": logprobs.masked_sum(token_logps, batch["loss_mask"])}
        if per_token:
            stats["token_logps"] = token_logps
        if sum_sq:
            stats["log_sum_sq"] = lss.reshape(tokens.shape)
        return stats


def pair_lengths(batch) -> jax.Array:
    """Scored tokens per pair and side: [B, 2] float32."""
    mask = batch["loss_mask"]
    if is_packed(batch):
        num_pairs = batch["pair_mask"].shape[0]
        return logprobs.pair_sums(jnp.ones(mask.shape), batch["slot_ids"], num_pairs, mask)
    return logprobs.token_counts(mask)


def pair_logps(params, batch, *, model, options: ScoringOptions = DEFAULT_SCORING) -> jax.Array:
    """Per-pair log-prob sums `[B, 2]` float32 (0 = chosen; 0 on padding pairs) of `params`.

    Scores any model on preference pairs: the reference once for a cached run
    (`batch["ref_logps"]`), or a policy to rank pairs. Padded or packed batch; one forward.
    Jit it with `functools.partial` binding `model` and `options`.
    """
    check_preference_batch(batch)
    stats = Scoring(model, options).pair_stats(params, batch, batch["pair_mask"].shape[0])
    return jnp.where(batch["pair_mask"][:, None] != 0, stats["logps"], 0.0)
