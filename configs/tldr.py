"""TL;DR summarization (the paper's Sec. 6.1, Reddit TL;DR with human preferences).

The paper starts from a GPT-J SFT model, a family dpo_jax does not implement; this preset
uses the Pythia-2.8B architecture (load any supported SFT checkpoint with
model.hf_path). Data: the TL;DR comparisons as local {"prompt", "chosen", "rejected"}
JSONL files (prompt = the post ending in "TL;DR:"); prompts keep their end so the
"TL;DR:" cue survives truncation.

    python -m dpo_jax.main --config=configs/tldr.py --workdir=/tmp/tldr \
      --config.model.hf_path=/data/pythia-2.8b-tldr-sft \
      --config.data.train_files=/data/tldr/train.jsonl \
      --config.data.eval_files=/data/tldr/valid.jsonl

ARG: '' | 'tiny' (seconds on a CPU, the variant the tests run).
"""

from dpo_jax.train.defaults import base_config, optimizer_config, shrink_to_tiny


def get_config(arg=None):
    c = base_config()
    c.stages = ("dpo",)
    c.model.preset = "pythia-2.8b"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.dpo.init_from = "model"
    c.data.truncation_mode = "keep_end"
    c.data.max_length = 640
    c.data.max_prompt_length = 512
    # TL;DR comparisons pair summaries sampled from several policies, so some pairs are
    # likely identical (or empty) and cannot be trained on: skip and count them (reported in
    # the end summary and metrics.jsonl) rather than stop a run on one such record.
    c.data.on_bad_record = "skip"
    c.dpo.steps = 1500
    c.dpo.batch_size = 64
    c.dpo.loss.beta = 0.5
    c.sweep = tuple({"dpo.loss.beta": beta} for beta in (0.05, 0.1, 0.25, 0.5))
    c.dpo.optimizer = optimizer_config(name="rmsprop", learning_rate=1e-6, warmup_steps=150)
    c.eval.max_batches = 16
    if arg == "tiny":
        shrink_to_tiny(c)
        c.model.dtype = "float32"
        c.model.remat = False
    elif arg:
        raise ValueError(f"unknown tldr variant {arg!r}; use '' or 'tiny'")
    c.lock()
    return c
