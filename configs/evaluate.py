"""Evaluate a policy by what it generates: reward, KL to the reference, win rate vs chosen.

A training workdir (its final export <workdir>/hf; or each DPO checkpoint, or PPO's for a
run with a ppo stage, with --config.checkpoints=all), after e.g. the quickstart:

    python -m dpo_jax.main --config=configs/quickstart.py --workdir=/tmp/dpo_quickstart
    python -m dpo_jax.evaluate --config=configs/evaluate.py --workdir=/tmp/dpo_quickstart

A Hugging Face directory, with its reference and prompts (outputs go to --workdir/eval):

    python -m dpo_jax.evaluate --config=configs/evaluate.py --workdir=/tmp/eval_policy \
        --config.policy_hf_path=/models/policy --config.reference_hf_path=/models/sft \
        --config.prompts.files=/data/imdb_test_prefixes.jsonl

The paper's second comparison, against another system's samples of the same prompts (an
earlier evaluation's samples file, e.g. of the SFT model, at the same temperatures):

    python -m dpo_jax.evaluate --config=configs/evaluate.py --workdir=/tmp/dpo_quickstart \
        --config.baseline_samples=/tmp/eval_sft/eval/samples_hf.jsonl

`:tiny` is the seconds-long variant the tests run (8 prompts, 8 new tokens, every checkpoint).
"""

import ml_collections

from dpo_jax.evaluation import options


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0  # sampling keys: the same seed gives the same samples
    c.dtype = "float32"  # compute dtype of HF-loaded models: float32 | bfloat16

    # --- What to evaluate ------------------------------------------------------------------
    c.policy_hf_path = ""  # an HF directory to evaluate; empty = the --workdir training run
    # workdir: final (<workdir>/hf) | latest | all (checkpoints/dpo, or checkpoints/ppo)
    c.checkpoints = "final"
    c.reference_hf_path = ""  # HF directory of the reference; empty = the run's SFT / init
    c.tokenizer = ""  # tokenizer directory; empty = the policy's (or the run's)

    # --- Prompts -----------------------------------------------------------------------------
    c.prompts = ml_collections.ConfigDict()
    c.prompts.files = ()  # preference or {prompt, completion} records; empty = run's held-out
    c.prompts.format = "auto"  # record format (see dpo_jax.data.formats)
    c.prompts.max_prompts = 256  # the first N records (0 = all)
    c.prompts.max_prompt_length = 256  # tokens kept of a long prompt, as in training
    c.prompts.truncation_mode = "keep_start"  # keep_start | keep_end (HH dialogues)
    c.prompts.tokenize_mode = "reference"  # reference (the paper's) | joint (TRL's)

    # --- Sampling ----------------------------------------------------------------------------
    c.sampling = options.sampling_config()  # temperatures, max_new_tokens, top_k/p, ...
    c.kl_batch_size = 32  # sequences per teacher-forced reference forward

    # --- Scoring -----------------------------------------------------------------------------
    c.reward = options.reward_config()  # vader | classifier (a local HF directory) | none
    c.implicit_beta = -1.0  # implicit reward's beta; -1 = the run's dpo.loss.beta (HF: 0.1)
    c.baseline_samples = ""  # samples_<x>.jsonl of another system (same prompts): win rate
    c.judge_template = ""  # tldr | hh: also write judge_*.jsonl requests for an LLM judge

    c.progress_bar = True  # tqdm bar over checkpoints x temperatures

    if arg == "tiny":
        c.checkpoints = "all"
        c.prompts.max_prompts = 8
        c.prompts.max_prompt_length = 16
        c.sampling.temperatures = (0.0, 1.0)
        c.sampling.max_new_tokens = 8
        c.sampling.num_samples = 2
        c.sampling.batch_size = 4
        c.kl_batch_size = 16
        c.progress_bar = False
    elif arg:
        raise ValueError(f"unknown evaluate variant {arg!r}; use '' or 'tiny'")
    c.lock()
    return c
