"""Generation-based evaluation inside a training run (`config.eval.generate`).

Every `eval.generate.every_steps` DPO steps (and at the end), the policy samples
completions for the first `eval.generate.num_prompts` held-out prompts; the samples are
scored by the configured reward, compared with the dataset's chosen responses (win rate),
and, when the run holds reference params (`dpo.reference='params'`), their sequence-level
KL to the reference is estimated: the reward-vs-KL curve of the DPO paper, along training.
It is `dpo_jax.evaluation.run.evaluate_one`, the same code as `python -m dpo_jax.evaluate`,
fed from the run's own data and params. Metrics go to metrics.jsonl as `generate/<name>`,
samples to `<workdir>/eval/train_samples_<step>.jsonl`.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from dpo_jax.evaluation import inputs as eval_inputs
from dpo_jax.evaluation import options
from dpo_jax.evaluation.run import Setup, evaluate_one


def generation_config() -> ml_collections.ConfigDict:
    """`config.eval.generate` (off by default: `every_steps = 0`)."""
    c = ml_collections.ConfigDict()
    c.every_steps = 0  # sample and score the held-out prompts every N DPO steps (0 = off)
    c.num_prompts = 64  # the first N held-out pairs' prompts
    c.sampling = options.sampling_config()  # temperatures, max_new_tokens, top_k/p, ...
    c.sampling.max_new_tokens = 32
    c.kl_batch_size = 32  # sequences per teacher-forced reference forward
    c.reward = options.reward_config()  # vader | classifier (a local HF directory) | none
    return c


class GenerationEval:
    """Samples, scores and (with reference params) KL of the policy on held-out prompts.

    splits: the run's `inputs.Splits`; model: the policy's module; reference: the frozen
    reference params or None; beta: of the implicit reward (the DPO loss's beta).
    """

    def __init__(self, config, splits, model, reference, beta: float, workdir: str):
        g = config.eval.generate
        self.model, self.seed = model, config.seed
        self.directory = os.path.join(workdir, "eval")
        tokenizer = splits.tokenizer
        pairs = splits.eval_pairs[: g.num_prompts]
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prompts = eval_inputs.Prompts(
            ids=[list(p.prompt_ids) for p in pairs],
            texts=[decode(p.prompt_ids) for p in pairs],
            chosen=[decode(p.chosen_ids) for p in pairs],
        )
        reward = eval_inputs.build_reward(g)
        # The dataset's responses are scored once, not at every evaluation.
        chosen_rewards = (
            None if reward is None else np.asarray(reward(prompts.texts, prompts.chosen))
        )
        ref = None if reference is None else (model, reference)
        self.setup = Setup(g, tokenizer, prompts, ref, reward, chosen_rewards, beta, None, None)

    def __call__(self, params, step: int) -> dict[str, float]:
        """Metrics `generate/<name>` (per temperature `generate/T<t>/<name>` when several)."""
        metrics, samples = {}, []
        temperatures = [float(t) for t in self.setup.config.sampling.temperatures]
        for t_index, temperature in enumerate(temperatures):
            # The same keys at every step: successive evaluations differ by the policy only.
            key = jax.random.fold_in(jax.random.key(self.seed), t_index)
            row, rows, _ = evaluate_one(
                self.setup, f"step{step}", self.model, params, temperature, key
            )
            prefix = "generate/" if len(temperatures) == 1 else f"generate/T{temperature:g}/"
            metrics.update(
                {
                    prefix + k: float(v)
                    for k, v in row.items()
                    if isinstance(v, int | float) and k != "temperature"
                }
            )
            samples += rows
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"train_samples_{step}.jsonl")
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(s) + "\n" for s in samples)
            os.replace(path + ".tmp", path)
        return metrics
