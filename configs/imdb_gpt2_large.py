"""IMDb controlled sentiment generation with GPT-2 large (the paper's Sec. 6.1, Fig. 2).

The paper's preference pairs are completions of IMDb review prefixes sampled from the SFT
model and ranked by a sentiment classifier; bring them as a local JSONL file of
{"prompt", "chosen", "rejected"} records. The paper sweeps beta to trace the
reward/KL frontier: this config carries that sweep.

    python -m dpo_jax.main --config=configs/imdb_gpt2_large.py --workdir=/tmp/imdb \
      --config.model.hf_path=/data/gpt2-large-imdb-sft \
      --config.data.train_files=/data/imdb_pairs/train.jsonl --sweep_index=-1

ARG: '' | 'tiny' (seconds on a CPU, the variant the tests run).
"""

from dpo_jax.train.defaults import base_config, optimizer_config, shrink_to_tiny


def get_config(arg=None):
    c = base_config()
    c.stages = ("dpo",)
    c.model.preset = "gpt2-large"
    c.dpo.init_from = "model"
    c.data.max_length = 128  # 8-token-ish prefixes plus short completions
    c.data.max_prompt_length = 64
    c.data.pad_to_multiple_of = 32
    # Pairs are two samples of the SFT model for one prefix: with short completions, two
    # identical (or empty) samples are likely. Skip and count them (reported in the end
    # summary and metrics.jsonl) rather than stop the run.
    c.data.on_bad_record = "skip"
    c.dpo.steps = 1000
    c.dpo.batch_size = 64
    c.dpo.loss.beta = 0.1
    c.dpo.optimizer = optimizer_config(name="rmsprop", learning_rate=1e-6, warmup_steps=150)
    c.sweep = tuple({"dpo.loss.beta": beta} for beta in (0.05, 0.1, 1.0, 5.0))
    if arg == "tiny":
        shrink_to_tiny(c)
    elif arg:
        raise ValueError(f"unknown imdb variant {arg!r}; use '' or 'tiny'")
    c.lock()
    return c
