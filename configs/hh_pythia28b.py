"""Anthropic HH with Pythia-2.8B: the paper's single-turn dialogue experiment (Sec. 6.1).

SFT on the chosen transcripts, then DPO (beta 0.1, RMSprop 1e-6, 150 warmup steps,
batch 64, max_length 512, max_prompt_length 256, prompts truncated keeping their end).
Data: the official `*.jsonl.gz` files of Anthropic/hh-rlhf in a local directory, e.g.
helpful-base/train.jsonl.gz; the HH record format splits each transcript at its last
"\\n\\nAssistant:". Model: a local copy of EleutherAI/pythia-2.8b.

    python -m dpo_jax.main --config=configs/hh_pythia28b.py --workdir=/tmp/hh \
      --config.model.hf_path=/data/pythia-2.8b \
      --config.data.train_files=/data/hh/helpful-base/train.jsonl.gz \
      --config.data.eval_files=/data/hh/helpful-base/test.jsonl.gz

Or through the TFDS builder (array_record, no TensorFlow), prepared from the same files:
`--config.data.tfds_name=hh_rlhf/all --config.data.tfds_manual_dir=/data/hh
--config.data.tfds_data_dir=/data/tfds --config.data.format=standard` (the builder has
already split off the prompts).

On a pod, shard with e.g. `--config.parallel.mesh_shape=-1,8,1` (FSDP over 8 chips).
ARG: '' | 'tiny' (seconds on a CPU, the variant the tests run).
"""

from dpo_jax.train.defaults import base_config, optimizer_config, shrink_to_tiny


def get_config(arg=None):
    c = base_config()
    c.stages = ("sft", "dpo")
    c.model.preset = "pythia-2.8b"  # architecture; weights come from model.hf_path
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.data.format = "hh"
    c.data.truncation_mode = "keep_end"  # HH prompts keep their most recent turns
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    # The public HH files hold records the HH rule cannot use (harmless-base test: 8 empty
    # chosen responses, 8 rejected transcripts with another dialogue history): skip and count
    # them (the end summary and metrics.jsonl report the counts) instead of stopping the run.
    c.data.on_bad_record = "skip"
    c.sft.steps = 2500  # about one epoch of HH's 160k chosen transcripts at batch 64
    c.sft.batch_size = 64
    c.sft.optimizer = optimizer_config(name="rmsprop", learning_rate=5e-7, warmup_steps=150)
    c.dpo.steps = 2500
    c.dpo.batch_size = 64
    c.dpo.loss.name = "sigmoid"
    c.dpo.loss.beta = 0.1
    c.dpo.optimizer = optimizer_config(name="rmsprop", learning_rate=1e-6, warmup_steps=150)
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    c.eval.max_batches = 16
    if arg == "tiny":
        shrink_to_tiny(c)
        c.model.dtype = "float32"
        c.model.remat = False
    elif arg:
        raise ValueError(f"unknown hh variant {arg!r}; use '' or 'tiny'")
    c.lock()
    return c
