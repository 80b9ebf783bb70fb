"""RLHF with PPO: SFT, a reward model on the preference pairs, then PPO against it.

The DPO paper's baseline (Sec. 3, 6): the policy and the reference start from this run's
SFT model; the reward model (Bradley-Terry on the same pairs) also initialises the value
model; each PPO iteration samples the pairs' prompts, scores the responses with the reward
model, and takes clipped PPO updates (TRL's PPOConfig defaults: 4 epochs, 1 minibatch,
AdamW 3e-6, kl_coef 0.05, gamma 1, lambda 0.95). The final policy is exported to <workdir>/hf:

    python -m dpo_jax.main --config=configs/ppo.py --workdir=/tmp/ppo \
      --config.model.hf_path=/path/to/base_model \
      --config.data.train_files=/path/to/train.jsonl --config.data.eval_files=/path/to/test.jsonl

Adaptive KL control toward a target (the paper sweeps 3, 6, 9, 12 nats):
`--config.ppo.kl_target=6`. Ground-truth reward instead of the learned one (PPO-GT):
`--config.stages="('sft', 'ppo')" --config.ppo.reward=ground_truth` (VADER by default).

ARG: '' (the setup above) | 'tiny' (seconds on a CPU, the variant the tests run: PPO of a 1-layer
random tiny model on the toy task's prompts, the reward the number of "a" in the response) |
'tiny_learned' (tiny, with the SFT -> reward model -> PPO stages of '').
"""

from dpo_jax.train.defaults import base_config, shrink_to_tiny

ARGS = ("", "tiny", "tiny_learned")


def get_config(arg=None):
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"configs/ppo.py: unknown argument {arg!r}; use one of {ARGS}")
    c = base_config()
    c.stages = ("sft", "rm", "ppo")
    c.sft.steps = 1000
    c.rm.steps = 1000
    c.rm.init_from = "sft"
    c.ppo.steps = 200
    c.ppo.batch_size = 64
    c.ppo.reward = "learned"
    c.ppo.init_from = "sft"
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    c.eval.generate.every_steps = 0
    if arg.startswith("tiny"):
        if arg == "tiny":
            c.stages = ("ppo",)
            c.ppo.reward = "ground_truth"
            c.ppo.ground_truth.name = "count"
            c.ppo.ground_truth.target = "a"
        shrink_to_tiny(c)
        c.model.overrides.num_layers = 1  # compile time is most of a tiny run
        c.ppo.batch_size = 16
        c.ppo.epochs = 2
        c.ppo.num_minibatches = 2
        c.ppo.score_norm = "norm"  # running moments: resumed from the checkpoint too
        c.ppo.kl_target = 1.0  # the adaptive controller (its coefficient is resumed too)
        c.ppo.kl_horizon = 100
        c.ppo.optimizer.learning_rate = 1e-2
        c.ppo.optimizer.warmup_steps = 0
    c.lock()
    return c
