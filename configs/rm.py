"""A reward model: a scalar head on the decoder, trained with the Bradley-Terry loss.

TRL's RewardTrainer recipe (trl 1.16 `RewardConfig` defaults: AdamW lr 1e-5, no centring)
on the same preference pairs as DPO. The trunk starts from a local Hugging Face checkpoint
(typically your SFT model), the head `score: [D, 1]` from a fresh normal init; the export
`<workdir>/hf` is a `*ForSequenceClassification` directory with num_labels=1 that
`dpo_jax.evaluation.rewards.HFClassifierReward` (or transformers) loads:

    python -m dpo_jax.main --config=configs/rm.py --workdir=/tmp/rm \
      --config.model.hf_path=/path/to/sft_model \
      --config.data.train_files=/path/to/train.jsonl --config.data.eval_files=/path/to/test.jsonl

ARG: '' (the setup above) | 'tiny' (seconds on a CPU, the variant the tests run) |
'sft' (SFT on the chosen responses first, then the reward model from it).
"""

from dpo_jax.train.defaults import base_config, shrink_to_tiny


def get_config(arg=None):
    c = base_config()
    c.stages = ("sft", "rm") if arg == "sft" else ("rm",)
    c.rm.init_from = "sft" if arg == "sft" else "model"
    c.sft.steps = 1000 if arg == "sft" else 0  # SFT on the pairs' chosen responses
    c.rm.steps = 1000
    c.rm.batch_size = 64
    c.rm.center_rewards_coefficient = 0.0
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    c.eval.generate.every_steps = 0
    if arg == "tiny":
        shrink_to_tiny(c)
        c.rm.optimizer.learning_rate = 3e-3
    elif arg not in (None, "", "sft"):
        raise ValueError(f"configs/rm.py: unknown argument {arg!r} ('' | 'tiny' | 'sft')")
    c.lock()
    return c
