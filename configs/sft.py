"""Supervised fine-tuning on the preferred responses: the first stage of the DPO recipe.

The paper fine-tunes on the chosen completions of the preference set before DPO.

    python -m dpo_jax.main --config=configs/sft.py --workdir=/tmp/sft \
      --config.model.hf_path=/path/to/base_model --config.data.train_files=/path/to/train.jsonl

The final policy is exported to <workdir>/hf, the `model.hf_path` of a later DPO run.
ARG: '' | 'tiny' (seconds on a CPU, the variant the tests run).
"""

from dpo_jax.train.defaults import base_config, optimizer_config, shrink_to_tiny


def get_config(arg=None):
    c = base_config()
    c.stages = ("sft",)
    c.sft.steps = 2000
    c.sft.batch_size = 64
    # The reference code's default optimizer (config.yaml: RMSprop, lr 5e-7, 150 warmup steps).
    c.sft.optimizer = optimizer_config(name="rmsprop", learning_rate=5e-7, warmup_steps=150)
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    if arg == "tiny":
        shrink_to_tiny(c)
    elif arg:
        raise ValueError(f"unknown sft variant {arg!r}; use '' or 'tiny'")
    c.lock()
    return c
