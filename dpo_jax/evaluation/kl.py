"""Sequence-level KL(policy || reference), estimated from the policy's own samples.

For completions y_i ~ pi(. | x_i) (i = 1..N), the per-sample log-ratio

    d_i = log pi(y_i | x_i) - log pi_ref(y_i | x_i) = sum_t [log pi(y_it | x_i, y_i<t)
                                                           - log pi_ref(y_it | x_i, y_i<t)]

(a sum over the sampled tokens, EOS included) is an unbiased estimate of
KL(pi(. | x_i) || pi_ref(. | x_i)); the estimate is mean(d) with standard error
std(d) / sqrt(N). This is the "sequence-level KL" axis of the DPO paper's reward/KL
frontier (Rafailov et al. 2023, arXiv 2305.18290, Fig. 2).

Which pi: the estimate is the KL of the distribution the samples were drawn from. Pass the
sampler's log-probs under the sampling distribution (temperature, top-k/top-p applied) to
get KL(sampling distribution || pi_ref), which equals KL(pi || pi_ref) at temperature 1
without truncation. The reference log-probs come from teacher forcing (`sequence_logps`):
the reference is never sampled from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import logprobs
from dpo_jax.data.batching import pad_sequences
from dpo_jax.data.examples import TokenizedSequence

__all__ = ["KLEstimate", "completion_logps", "sequence_kl", "sequence_logps"]


@functools.partial(jax.jit, static_argnames=("model", "memory_efficient"))
def _sequence_logps(model, params, tokens, positions, segment_ids, loss_mask, memory_efficient):
    variables = {"params": params}
    if memory_efficient:
        hidden, unembed = model.apply(variables, tokens, positions, segment_ids, method="features")
        token_logps = logprobs.token_logps_from_features(hidden, unembed, tokens)
    else:
        token_logps = logprobs.token_logps(
            model.apply(variables, tokens, positions, segment_ids), tokens
        )
    return logprobs.masked_sum(token_logps, loss_mask)


def sequence_logps(
    model,
    params,
    tokens,
    loss_mask,
    *,
    positions=None,
    segment_ids=None,
    memory_efficient: bool = False,
) -> jax.Array:
    """Teacher-forced log-prob sums of the scored tokens: sum_t loss_mask[t] log p(tokens[t] |
    tokens[<t]) per row, from one forward pass `model.apply` (jitted per model and shape).

    Args:
      model, params: a `DecoderLM` and its params (plain, not the `{"params": ...}` dict).
      tokens: [B, L] int, prompt + completion per row (any padding).
      loss_mask: [B, L] 0/1, 1 on the completion tokens to score (EOS included).
      positions: [B, L] int; default: counts the non-padding tokens of each row from 0, so
        left-padded rows get the positions an unpadded sequence would have.
      segment_ids: [B, L] int, 0 on padding; default: all ones (no padding).
      memory_efficient: log-probs from hidden states without a [B, L, V] buffer.
    Returns:
      [B] float32.
    """
    tokens = jnp.asarray(tokens)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(segment_ids != 0, axis=-1) - 1, 0).astype(jnp.int32)
    loss_mask = jnp.asarray(loss_mask)
    return _sequence_logps(
        model, params, tokens, jnp.asarray(positions), segment_ids, loss_mask, memory_efficient
    )


def completion_logps(
    model,
    params,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = 32,
    memory_efficient: bool = False,
) -> np.ndarray:
    """log pi(completion | prompt) for ragged token-id lists, by teacher forcing.

    Rows are right-padded with `dpo_jax.data.batching.pad_sequences` (the SFT batch layout:
    loss_mask 1 on the completion) in batches of `batch_size`; lengths are rounded up to
    `pad_to_multiple_of` so that a few shapes are compiled, not one per batch.

    Args:
      prompt_ids: N lists of prompt token ids (at least one each, e.g. BOS).
      completion_ids: N lists of completion token ids (at least one each; EOS included when
        the sample stopped there).
    Returns:
      [N] float64 sequence log-prob sums.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"completion_logps: {len(prompt_ids)} prompts but {len(completion_ids)} completions"
        )
    if not prompt_ids:
        raise ValueError("completion_logps: empty list of sequences")
    if batch_size < 1:
        raise ValueError(f"completion_logps: batch_size must be >= 1, got {batch_size}")
    seqs = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if len(p) == 0 or len(c) == 0:
            # The first token of a sequence has no prediction, and an empty completion has
            # nothing to score: either would silently give log-prob 0.
            which = "prompt" if len(p) == 0 else "completion"
            raise ValueError(f"completion_logps: sequence {i} has an empty {which}")
        seqs.append(TokenizedSequence(list(p), list(c)))
    longest = max(len(s.prompt_ids) + len(s.completion_ids) for s in seqs)
    max_length = longest
    if pad_to_multiple_of:
        rounded = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        # Never pad past a learned position table: sequences that fit must stay valid.
        max_length = max(longest, min(rounded, model.config.max_position_embeddings))
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        # A fixed batch size (the last batch padded with empty rows) keeps one compiled shape.
        batch = pad_sequences(
            chunk,
            max_length=max_length,
            pad_id=pad_id,
            pad_to_multiple_of=pad_to_multiple_of,
            batch_size=min(batch_size, len(seqs)),
        )
        sums = sequence_logps(
            model,
            params,
            batch["tokens"],
            batch["loss_mask"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            memory_efficient=memory_efficient,
        )
        out.append(np.asarray(sums, np.float64)[: len(chunk)])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL estimate: `mean` +- `stderr` over `num_samples`; `per_sample` = d_i."""

    mean: float
    stderr: float
    num_samples: int
    per_sample: np.ndarray


def paired_logps(where: str, policy_logps, ref_logps) -> tuple[np.ndarray, np.ndarray]:
    """Policy and reference sequence log-probs of the same N samples as float64 [N], or a
    ValueError naming `where` and the first bad entry."""
    policy_logps = np.asarray(policy_logps, np.float64)
    ref_logps = np.asarray(ref_logps, np.float64)
    if policy_logps.ndim != 1 or policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"{where}: need policy_logps and ref_logps of one shape [N], got "
            f"{policy_logps.shape} and {ref_logps.shape}"
        )
    if policy_logps.size == 0:
        raise ValueError(f"{where}: no samples (empty log-prob arrays)")
    for name, values in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            # -inf from the reference means a sample it cannot produce: the KL is infinite,
            # which a mean would report only as inf/NaN without saying where.
            raise ValueError(
                f"{where}: {name}[{int(bad[0])}] = {values[bad[0]]} is not finite "
                f"({bad.size} non-finite samples)"
            )
    return policy_logps, ref_logps


def sequence_kl(policy_logps, ref_logps) -> KLEstimate:
    """KL(pi || pi_ref) from N samples of pi: mean and standard error of d = policy - ref.

    Args:
      policy_logps: [N] log pi(y_i | x_i) of samples y_i drawn from pi (sequence sums).
      ref_logps: [N] log pi_ref(y_i | x_i) of the same samples.
    Returns:
      KLEstimate; `stderr` = std(d, ddof=1) / sqrt(N), NaN when N = 1 (undefined).
    """
    policy_logps, ref_logps = paired_logps("sequence_kl", policy_logps, ref_logps)
    d = policy_logps - ref_logps
    n = d.size
    stderr = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return KLEstimate(float(d.mean()), stderr, n, d)
