"""Evaluation of a policy by what it generates: rewards, KL to the reference, win rates.

rewards   `reward(prompts, completions) -> [N]`: VADER sentiment, a local HF classifier /
          reward model, the policy's implicit DPO reward
kl        sequence-level KL(policy || reference) from policy samples, teacher-forced
          reference log-probs of sampled sequences
judges    pairwise judges `judge(prompts, a, b) -> [N] in {1, 0.5, 0}`: by a reward, or by
          an external (LLM) judge through a JSONL round trip; win rates with Wilson intervals
inputs    what `python -m dpo_jax.evaluate` evaluates: an HF directory or a training workdir's
          export / checkpoints, its reference, tokenizer and held-out prompts
run       the evaluation job: sample, score, KL, win rate vs chosen; eval/ tables
"""

from dpo_jax.evaluation import judges, kl, rewards
from dpo_jax.evaluation.judges import (
    HH_TEMPLATE,
    TLDR_TEMPLATE,
    RewardJudge,
    read_judge_verdicts,
    win_rate,
    write_judge_requests,
)
from dpo_jax.evaluation.kl import KLEstimate, completion_logps, sequence_kl, sequence_logps
from dpo_jax.evaluation.rewards import HFClassifierReward, VaderSentiment, implicit_reward

__all__ = [
    "HH_TEMPLATE",
    "TLDR_TEMPLATE",
    "HFClassifierReward",
    "KLEstimate",
    "RewardJudge",
    "VaderSentiment",
    "completion_logps",
    "implicit_reward",
    "judges",
    "kl",
    "read_judge_verdicts",
    "rewards",
    "sequence_kl",
    "sequence_logps",
    "win_rate",
    "write_judge_requests",
]
