"""The sampling and reward options of a generation-based evaluation, each field commented
once: used by `configs/evaluate.py` (the `dpo_jax.evaluate` job) and by a training run's
periodic evaluation (`config.eval.generate`)."""

from __future__ import annotations

import ml_collections


def sampling_config() -> ml_collections.ConfigDict:
    """How completions are sampled (`dpo_jax.sampling.sample`)."""
    c = ml_collections.ConfigDict()
    # One metrics row per temperature. 0 = greedy: its KL is that of a point mass,
    # -log pi_ref(y), and its samples of one prompt are all the same.
    c.temperatures = (1.0,)
    c.max_new_tokens = 64  # completion budget; stops earlier at EOS
    c.top_k = 0  # keep the k most probable tokens (0 = off)
    c.top_p = 1.0  # nucleus mass (1 = off); KL is then to the truncated distribution
    c.num_samples = 1  # completions per prompt (one prefill each)
    c.batch_size = 32  # prompts per sampler call
    return c


def reward_config() -> ml_collections.ConfigDict:
    """The ground-truth reward of a completion (`dpo_jax.evaluation.inputs.build_reward`)."""
    c = ml_collections.ConfigDict()
    c.name = "vader"  # vader (lexicon sentiment) | classifier (local HF model) | none
    c.with_prompt = False  # score prompt + completion instead of the completion alone
    c.path = ""  # classifier: local AutoModelForSequenceClassification directory
    c.label = ""  # classifier: class whose score is the reward, e.g. POSITIVE (or index)
    c.score = "log_odds"  # classifier: log_odds | log_prob | prob | logit
    c.batch_size = 16  # classifier: texts per forward
    c.device = "cpu"  # classifier: torch device
    return c
