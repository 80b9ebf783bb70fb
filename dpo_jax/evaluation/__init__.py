"""Evaluation of a policy by what it generates: rewards, KL to the reference, win rates.

rewards   `reward(prompts, completions) -> [N]`: VADER sentiment, a local HF classifier /
          reward model, the policy's implicit DPO reward
kl        sequence-level KL(policy || reference) from policy samples, teacher-forced
          reference log-probs of sampled sequences
judges    pairwise judges `judge(prompts, a, b) -> [N] in {1, 0.5, 0}`: by a reward, or by
          an external (LLM) judge through a JSONL round trip; win rates with Wilson intervals
"""
