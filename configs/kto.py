"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306) with TRL KTOTrainer's defaults.

Unpaired data: {"prompt", "completion", "label": true/false} records; preference records
(chosen/rejected) in the same files are split into a desirable and an undesirable example
(TRL's `unpair_preference_dataset`). `config.dpo.loss.name='kto'` switches the DPO stage to
unpaired batches: each example comes with a KL sequence (its prompt with the previous
example's completion in the batch) from which KTO's KL baseline is estimated. beta 0.1,
desirable / undesirable weights 1.0, AdamW lr 1e-6 (TRL's defaults); the policy and the
frozen reference start from a local Hugging Face checkpoint (typically your SFT model):

    python -m dpo_jax.main --config=configs/kto.py --workdir=/tmp/kto \
      --config.model.hf_path=/path/to/sft_model \
      --config.data.train_files=/path/to/train.jsonl --config.data.eval_files=/path/to/test.jsonl

LoRA KTO (adapters on the base, which is also the reference: one copy of the weights):
add `--config.dpo.lora.rank=16`. With unbalanced data, TRL's advice is weights such that
desirable_weight * #desirable / (undesirable_weight * #undesirable) lies in [1, 4/3], e.g.
`--config.dpo.loss.hparams.undesirable_weight=0.5`.

ARG: '' (TRL's defaults) | 'tiny' (seconds on a CPU, the variant the tests run) |
'apo_zero_unpaired' (the same run with APO-zero's unpaired loss, no KL baseline).
"""

from dpo_jax.train.defaults import base_config, optimizer_config, shrink_to_tiny


def get_config(arg=None):
    c = base_config()
    c.stages = ("dpo",)
    c.dpo.init_from = "model"
    c.dpo.reference = "params"  # the KL sequences change with the shuffle: nothing to cache
    c.dpo.steps = 1000
    c.dpo.batch_size = 64  # examples per step; the KL baseline is estimated from each batch
    c.dpo.loss.name = "kto"
    c.dpo.loss.beta = 0.1
    c.dpo.loss.hparams.desirable_weight = 1.0
    c.dpo.loss.hparams.undesirable_weight = 1.0
    c.dpo.optimizer = optimizer_config(
        name="adamw", learning_rate=1e-6, warmup_steps=100, max_grad_norm=1.0
    )
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    if arg == "tiny":
        shrink_to_tiny(c)
    elif arg == "apo_zero_unpaired":
        c.dpo.loss.name = arg
    elif arg:
        raise ValueError(f"unknown kto variant {arg!r}; use '', 'tiny' or 'apo_zero_unpaired'")
    c.lock()
    return c
