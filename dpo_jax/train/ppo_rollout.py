"""PPO rollouts: the prompt stream, prompt + response rows, sequence rewards, and the one
jitted scoring function that turns a rollout into PPO's training targets.

Axis letters: B rollouts (one per prompt), T prompt columns (left-padded to the longest
prompt of the training set, so every iteration has the same shapes: one compilation),
M = `ppo.max_new_tokens` response columns, L = T + M.

A rollout's row is `[left padding | prompt | response | right padding]`: segment id 1 on the
prompt and on the response up to its length (its EOS included), 0 elsewhere; positions count
real tokens only, as the sampler's, so a row is scored exactly as it was sampled. Response
token j sits at column T + j; its log-prob and the value of the state before it come from
column T + j - 1 (`logprobs`' alignment, TRL's `values[:, context_length - 1 : -1]`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import logprobs
from dpo_jax.evaluation import inputs as eval_inputs
from dpo_jax.evaluation import rewards as text_rewards
from dpo_jax.losses import ppo as ppo_math

# ------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------


class PromptStream:
    """The training pairs' distinct prompts, in a fresh seeded order every epoch.

    `batch(position, n)` is the n prompts from global position `position` on (position p is
    entry p mod N of epoch p // N's permutation): a pure function of (seed, position), so the
    checkpoint holds the position only, and every process draws the same global batch.
    """

    def __init__(self, pairs, seed: int):
        seen, prompts = set(), []
        for pair in pairs:
            key = tuple(pair.prompt_ids)
            if key not in seen:
                seen.add(key)
                prompts.append(list(pair.prompt_ids))
        if not prompts:
            raise ValueError("PPO: the training pairs hold no prompts")
        self.prompts, self.seed = prompts, seed
        self.width = max(len(p) for p in prompts)  # T

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one stream per stage, a few epochs alive
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def batch(self, position: int, n: int) -> list[list[int]]:
        N = len(self.prompts)
        return [self.prompts[self._order(p // N)[p % N]] for p in range(position, position + n)]


# ------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------


def rollout_rows(prompts: Sequence[Sequence[int]], tokens: np.ndarray, lengths: np.ndarray,
                 width: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Prompt + response rows of a rollout, as numpy.

    prompts: B token-id lists (each at most `width` = T long); tokens: [B, M] sampled
    responses (anything after `lengths`); lengths: [B] response tokens incl. the EOS.
    Returns tokens, positions, segment_ids [B, T + M] int32 and mask [B, M] float32
    (1 on the real response tokens).
    """
    B, M = tokens.shape
    mask = np.arange(M)[None, :] < np.asarray(lengths)[:, None]
    prompt_part = np.zeros((B, width), np.int32)
    prompt_seg = np.zeros((B, width), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > width:
            raise ValueError(f"PPO: prompt {i} has {len(p)} tokens, more than the {width} columns")
        prompt_part[i, width - len(p) :] = p
        prompt_seg[i, width - len(p) :] = 1
    response = np.where(mask, tokens, 0).astype(np.int32)  # pad ids may be invalid: use 0
    row_tokens = np.concatenate([prompt_part, response], axis=1)
    segment_ids = np.concatenate([prompt_seg, mask.astype(np.int32)], axis=1)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {
        "tokens": row_tokens,
        "positions": positions,
        "segment_ids": segment_ids,
        "mask": mask.astype(np.float32),
    }


def response_logps(logits: jax.Array, tokens: jax.Array, M: int) -> jax.Array:
    """Log-probs [B, M] float32 of the last M tokens of rows tokens [B, L] from logits
    [B, L, V]."""
    return logprobs.token_logps(logits, tokens)[:, -M:]


def response_values(values: jax.Array, M: int) -> jax.Array:
    """[B, L] per-token values -> [B, M]: the value of the state before each response token."""
    return values[:, -M - 1 : -1]


def response_entropy(logits: jax.Array, M: int) -> jax.Array:
    """Entropy [B, M] float32 of the distributions the response tokens were drawn from."""
    logp = jax.nn.log_softmax(logits[:, -M - 1 : -1].astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ------------------------------------------------------------------------------------------
# Sequence rewards (host side)
# ------------------------------------------------------------------------------------------


class TextReward:
    """A text reward of `dpo_jax.evaluation.rewards` on decoded prompts and responses."""

    def __init__(self, reward, tokenizer):
        self.reward, self.tokenizer = reward, tokenizer

    def __call__(self, prompts, tokens, lengths, rows=None) -> np.ndarray:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        texts = [decode(list(p)) for p in prompts]
        completions = [decode(t[:n].tolist()) for t, n in zip(tokens, lengths, strict=True)]
        return np.asarray(self.reward(texts, completions), np.float32)


class RowReward:
    """A reward model of this run on the rollout rows: `score_rows(params, rows) -> [B]`, the
    `RewardModel`'s score of each row's last real token (prompt + response, as trained)."""

    def __init__(self, params, score_rows):
        self.params, self.score_rows = params, score_rows

    def __call__(self, prompts, tokens, lengths, rows=None) -> np.ndarray:
        return np.asarray(self.score_rows(self.params, rows), np.float32)


SCORE_NORMS = ("none", "scale", "norm")


def normalize_scores(scores: np.ndarray, moments: dict, how: str) -> tuple[np.ndarray, dict]:
    """(scores to train on, updated moments): TRL 0.x's `use_score_scaling` ("scale": divide
    by the running standard deviation of all scores so far, this batch included) and
    `use_score_norm` ("norm": also subtract the running mean); "none" passes them through.

    moments: {"mean", "var", "count"} of the scores seen before (count 0 at the start), merged
    with this batch by Chan et al.'s parallel update (TRL's RunningMoments); plain floats, so
    they travel in the checkpoint's JSON. The standard deviation is the unbiased one.
    """
    if how == "none":
        return scores, moments
    x = np.asarray(scores, np.float64)
    n, count = x.size, moments["count"]
    delta, total = x.mean() - moments["mean"], count + n
    m2 = moments["var"] * count + x.var() * n + delta**2 * count * n / total
    moments = {"mean": moments["mean"] + delta * n / total, "var": m2 / total, "count": total}
    std = np.sqrt(moments["var"] * total / max(total - 1, 1))
    shift = moments["mean"] if how == "norm" else 0.0
    return ((x - shift) / max(std, 1e-8)).astype(np.float32), moments


def ground_truth_reward(gt, tokenizer) -> TextReward:
    """`config.ppo.ground_truth` as a text reward: vader | classifier (as the evaluation
    builds them) | count (`SubstringCount` of `gt.target`)."""
    if gt.name == "count":
        reward = text_rewards.SubstringCount(gt.target, with_prompt=gt.with_prompt)
    else:
        reward = eval_inputs.build_reward(SimpleNamespace(reward=gt))
    return TextReward(reward, tokenizer)


# ------------------------------------------------------------------------------------------
# The jitted scoring of a rollout
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
    """What turns scores into PPO targets (static)."""

    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False

    @classmethod
    def from_config(cls, ppo) -> RolloutOptions:
        return cls(str(ppo.kl_estimator), float(ppo.gamma), float(ppo.lam),
                   bool(ppo.whiten_rewards))  # fmt: skip


def score_rollout(params, reference, rows, scores, kl_coef, *, policy, value, options):
    """Everything PPO needs from a rollout, in one program.

    params: {"policy", "value"}; reference: the frozen policy params; rows: `rollout_rows`
    (jax arrays); scores: [B] sequence rewards; kl_coef: [] float32 beta_KL.
    Teacher-forced on the rows: policy and reference log-probs and the values of the
    response tokens; then the KL-shaped per-token rewards (`losses.ppo.shaped_rewards`),
    optionally whitened with their mean kept, GAE advantages (whitened, as TRL) and returns.
    Returns a dict of [B, M] float32 arrays (0 after each response): logps, ref_logps,
    values, rewards, kl, advantages, returns.
    """
    tokens, mask = rows["tokens"], rows["mask"]
    M = mask.shape[1]
    kwargs = dict(positions=rows["positions"], segment_ids=rows["segment_ids"])
    logps = response_logps(policy.apply({"params": params["policy"]}, tokens, **kwargs), tokens, M)
    ref_logits = policy.apply({"params": jax.lax.stop_gradient(reference)}, tokens, **kwargs)
    ref_logps = response_logps(ref_logits, tokens, M)
    values = response_values(value.apply({"params": params["value"]}, tokens, **kwargs), M)
    m = mask > 0
    values = jnp.where(m, values, 0.0)
    rewards, kl = ppo_math.shaped_rewards(
        scores, logps, ref_logps, mask, kl_coef, options.kl_estimator
    )
    if options.whiten_rewards:
        rewards = ppo_math.whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo_math.gae(rewards, values, mask, options.gamma, options.lam)
    return {
        "logps": jnp.where(m, logps, 0.0),
        "ref_logps": jnp.where(m, ref_logps, 0.0),
        "values": values,
        "rewards": rewards,
        "kl": kl,
        "advantages": ppo_math.whiten(advantages, mask),
        "returns": returns,
    }
