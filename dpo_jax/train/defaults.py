"""The base run config: every field of a dpo_jax run, each commented once.

Config files in configs/ start from `base_config()` and override what their experiment
needs; the command line overrides single fields (`--config.dpo.loss.beta=0.5`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dpo_jax import losses, parallel
from dpo_jax.evaluation import options
from dpo_jax.train.generation import generation_config
from dpo_jax.train.optimizers import default_optimizer_config


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """A stage's optimizer: the paper's defaults (`default_optimizer_config`, where every
    field is documented) with `overrides`. `total_steps` is filled in from the stage."""
    opt = default_optimizer_config()
    opt.update(overrides)
    return opt


def loss_hparams_config() -> ml_collections.ConfigDict:
    """Every hyperparameter of the registered losses, unset (None: the loss's own default).

    Listing them all lets the command line set one (`--config.dpo.loss.hparams.label_smoothing
    =0.1`) in a locked config; `validate` refuses a value the chosen loss does not accept.
    """
    c = ml_collections.ConfigDict()
    for name in (*losses.names(), *losses.unpaired_names()):
        for hparam, default in sorted(losses.get(name).hparams.items()):
            c[hparam] = config_dict.placeholder(type(default))
    return c


def scoring_config(c: ml_collections.ConfigDict) -> None:
    """A stage's log-prob options (see `dpo_jax.train.scoring.ScoringOptions`)."""
    c.memory_efficient_logps = False  # log-probs from hidden states, no [B, L, V] buffer
    c.logps_chunk_size = 256  # memory-efficient path: sequence positions per chunk
    c.logps_vocab_chunk_size = 8192  # memory-efficient path: vocab block (0 = whole vocab)
    # Memory-efficient path, preference pairs: the [D, V] head only at positions whose next
    # token is scored (responses), chunks holding none skipped; exact. (SFT ignores it.)
    c.logps_scored_only = True
    # ... balanced over this many contiguous groups of rows (0 = each row alone; 1 = the
    # whole batch, best on one device; under a batch-sharded mesh: the batch shards).
    c.logps_scored_row_groups = 0
    # Memory-efficient path: keep the chunks' float32 logits for the backward pass instead
    # of recomputing them (one head matmul fewer; float32 [scored positions, V] of memory).
    c.logps_keep_logits = False


def base_config() -> ml_collections.ConfigDict:
    """All fields with the DPO paper's defaults where the paper sets them."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order and step rngs: runs are reproducible from it
    c.stages = ("dpo",)  # stages run in order: ("sft", "dpo") trains SFT first, then DPO

    # --- Model ---------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""  # local Hugging Face checkpoint directory (config.json + safetensors)
    c.model.preset = ""  # else a preset name from dpo_jax.models.presets (random init)
    c.model.overrides = ml_collections.ConfigDict()  # ModelConfig fields set on top of either
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    # Rematerialisation of each block in the backward pass (memory for compute): none | full
    # | dots_saveable | dots_with_no_batch_dims_saveable (keep matmul results, recompute the
    # rest) | offload_dots_with_no_batch_dims (keep the projections in pinned host memory);
    # True / False mean full / none. Any type, so configs may keep the boolean form.
    c.model.remat = config_dict.FieldReference(False, field_type=object)
    # Run the blocks as one nn.scan over stacked params: compile time independent of depth
    # (32 layers compile several times faster); params get a leading [num_layers] axis.
    c.model.scan_layers = False
    # Attention kernel: xla (einsum) | dot_product (jax.nn.dot_product_attention) | splash
    # (Pallas TPU kernel, 128-token blocks; no sliding window) | blocked (skips the blocks
    # packing masks out; pure JAX, fast on CPU). Same values, same gradients.
    c.model.attention = "xla"

    # --- Data ----------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.synthetic = False  # generate the quickstart's toy preference set into the workdir
    c.data.synthetic_size = 2048  # pairs generated when synthetic (train + eval)
    c.data.train_files = ()  # JSON/JSONL(.gz)/parquet files or HF datasets saved to disk
    c.data.eval_files = ()  # held-out pairs; empty = hold out `eval_fraction` of train
    c.data.eval_fraction = 0.05  # used only when eval_files is empty
    c.data.sft_files = ()  # SFT targets (prompt/completion); empty = chosen side of train_files
    c.data.tfds_name = ""  # instead of files: a TFDS dataset, e.g. "hh_rlhf/helpful_base"
    c.data.tfds_data_dir = ""  # where its array_record files are (or will be) prepared
    c.data.tfds_manual_dir = ""  # prepare it first from these local files (e.g. HH jsonl.gz)
    c.data.tfds_train_split = "train"  # TFDS split to train on
    c.data.tfds_eval_split = "test"  # held-out TFDS split; empty = hold out eval_fraction
    c.data.format = "auto"  # record format: auto | standard | implicit | conversational | hh
    c.data.tokenizer = ""  # local tokenizer directory (defaults to model.hf_path)
    c.data.tokenize_mode = "reference"  # reference (paper: separate) | joint (TRL)
    c.data.truncation_mode = "keep_start"  # prompt truncation: keep_start | keep_end (HH)
    c.data.max_length = 512  # prompt + response tokens
    c.data.max_prompt_length = 256  # prompt tokens kept when a pair is too long
    # padded [B, 2, L] | packed [R, L] rows of several pairs | packed_shared: rows of 2 L
    # holding whole pairs, each prompt once (prompt sharing; same values, fewer tokens)
    c.data.layout = "padded"
    c.data.pad_to_multiple_of = 64  # padded layout: L rounded up to this (few jit shapes)
    c.data.on_bad_record = "raise"  # raise (name file, line, field) | skip (and count)
    c.data.num_epochs = 0  # 0 = repeat forever; steps end the stage

    # --- SFT stage -----------------------------------------------------------------------
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0  # optimizer steps of the SFT stage
    c.sft.batch_size = 64  # sequences per step (global, over all processes)
    c.sft.accum_steps = 1  # micro-batches per step (same result as one big batch)
    scoring_config(c.sft)
    c.sft.optimizer = optimizer_config(name="adamw", learning_rate=1e-5, warmup_steps=10)

    # --- DPO stage -----------------------------------------------------------------------
    c.dpo = ml_collections.ConfigDict()
    c.dpo.steps = 1000  # optimizer steps of the DPO stage
    c.dpo.batch_size = 64  # preference pairs per step (global)
    c.dpo.accum_steps = 1  # micro-batches per step (same result as one big batch)
    c.dpo.init_from = "sft"  # policy and reference start: sft (this run's SFT) | model
    # params (frozen copy) | cached (per-pair sums computed once at the stage start, train
    # and held-out pairs, then the copy is freed) | none (reference-free losses). A loss that
    # needs no reference (orpo, simpo, cpo, ...) always runs as none: one model in memory.
    c.dpo.reference = "params"
    scoring_config(c.dpo)
    c.dpo.loss = ml_collections.ConfigDict()
    c.dpo.loss.name = "sigmoid"  # a name from dpo_jax.losses.names()
    c.dpo.loss.beta = 0.1  # the KL-penalty strength (meaning per loss: see its docstring)
    c.dpo.loss.hparams = loss_hparams_config()  # other loss arguments, e.g. label_smoothing
    c.dpo.optimizer = optimizer_config()
    # LoRA DPO (dpo_jax.models.lora): train low-rank adapters W + alpha/r A B of the DPO
    # stage's starting params, which stay frozen and are also the reference (adapters off):
    # one copy of the weights; the optimizer state and the checkpoints hold the adapters only;
    # the export merges them. The SFT stage, if any, still trains every param.
    c.dpo.lora = ml_collections.ConfigDict()
    c.dpo.lora.rank = 0  # adapter rank r; 0 = off (full fine-tuning)
    c.dpo.lora.alpha = 16.0  # the update is scaled by alpha / r (as PEFT's lora_alpha)
    c.dpo.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections adapted
    c.dpo.lora.base_dtype = "float32"  # frozen base weights: float32 | bfloat16 (half memory)

    # --- Reward-model stage (stages ("rm",) or ("sft", "rm"); not with "dpo") ----------------
    # A scalar head on the decoder trained with the Bradley-Terry loss on the DPO data's
    # pairs (dpo_jax/train/reward.py); the export is a *ForSequenceClassification directory.
    c.rm = ml_collections.ConfigDict()
    c.rm.steps = 1000  # optimizer steps of the reward-model stage
    c.rm.batch_size = 64  # preference pairs per step (global)
    c.rm.accum_steps = 1  # micro-batches per step (same result as one big batch)
    c.rm.init_from = "sft"  # trunk start: sft (this run's SFT) | model; the head is fresh
    c.rm.center_rewards_coefficient = 0.0  # TRL's weight of mean((r_c + r_r)^2); 0 = off
    c.rm.optimizer = optimizer_config(name="adamw", learning_rate=1e-5, warmup_steps=10)

    # --- PPO stage (RLHF; stages ("ppo",), ("sft", "ppo"), ("rm", "ppo") or ("sft", "rm",
    # "ppo"); not with "dpo") -------------------------------------------------------------
    # Each iteration: rollouts of the policy on a batch of the pairs' prompts, their sequence
    # reward, KL-shaped per-token rewards + GAE, then epochs x minibatches of clipped PPO
    # updates of the policy and a value model (dpo_jax/train/ppo.py; math: losses/ppo.py).
    c.ppo = ml_collections.ConfigDict()
    c.ppo.steps = 100  # PPO iterations (one rollout batch and its updates each)
    c.ppo.batch_size = 64  # prompts (one rollout each) per iteration (global)
    c.ppo.init_from = "sft"  # policy and reference start: sft (this run's SFT) | model
    c.ppo.max_new_tokens = 32  # response budget of a rollout (temperature 1, stops at EOS)
    c.ppo.epochs = 4  # passes over each rollout batch (TRL num_ppo_epochs)
    c.ppo.num_minibatches = 1  # updates per pass; must divide batch_size (TRL num_mini_batches)
    # Sequence reward: learned (this run's "rm" stage, else the classifier in reward_path) |
    # ground_truth (the text reward `ppo.ground_truth`, e.g. VADER: PPO-GT of the paper).
    c.ppo.reward = "ground_truth"
    c.ppo.reward_path = ""  # learned, no "rm" stage: an exported *ForSequenceClassification
    c.ppo.ground_truth = options.reward_config()  # vader | classifier | count (below)
    c.ppo.ground_truth.name = "vader"
    c.ppo.ground_truth.target = ""  # count: the substring whose occurrences are the reward
    c.ppo.value_model = "separate"  # separate: its own trunk (from the RM, else the policy)
    c.ppo.kl_coef = 0.05  # initial beta_KL of the per-token penalty -beta_KL * kl_t
    c.ppo.kl_estimator = "k1"  # per-token KL estimate: k1 | abs | mse | k3 (losses/ppo.py)
    # Adaptive controller (Ziegler et al. 2019): target sequence KL in nats (the DPO paper
    # sweeps 3, 6, 9, 12); None = the fixed coefficient kl_coef.
    c.ppo.kl_target = config_dict.placeholder(float)
    c.ppo.kl_horizon = 10000  # adaptive: samples over which beta_KL moves by at most 20%
    c.ppo.gamma = 1.0  # GAE discount
    c.ppo.lam = 0.95  # GAE lambda
    c.ppo.clip_range = 0.2  # policy ratio clip epsilon
    c.ppo.clip_range_value = 0.2  # value clip around the rollout's values
    c.ppo.vf_coef = 0.1  # weight of the value loss in the one loss of both models
    c.ppo.whiten_rewards = False  # whiten the shaped rewards (mean kept) before GAE (TRL)
    # Sequence scores: none | scale (divided by their running std) | norm (also minus their
    # running mean): TRL 0.x's use_score_scaling / use_score_norm.
    c.ppo.score_norm = "none"
    # Policy and value params are one tree under one optimizer (clipping over both), as
    # TRL's PolicyAndValueWrapper; its steps are iterations x epochs x num_minibatches.
    c.ppo.optimizer = optimizer_config(name="adamw", learning_rate=3e-6, warmup_steps=0)

    # --- Parallelism ---------------------------------------------------------------------
    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "jit"  # jit (sharded over a mesh) | pmap (replicated data parallel)
    c.parallel.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
    c.parallel.logical_axis_rules = parallel.DEFAULT_RULES  # logical name -> mesh axes
    c.parallel.reference_rules = "same"  # frozen reference: same | tensor | replicated
    c.parallel.coordinator_address = ""  # multi-host: host:port of process 0 (or from env)
    c.parallel.num_processes = 0  # multi-host: process count (0 = from env / single)
    c.parallel.process_id = -1  # multi-host: this process's index (-1 = from env)
    # multi-host without flags or DPO_JAX_* variables: let JAX detect the cluster (Cloud TPU,
    # Slurm, Open MPI, Kubernetes); off by default, since it fails outside a cluster
    c.parallel.auto_detect = False

    # --- Update guard (both stages) ------------------------------------------------------
    # A step whose loss, gradients or new params are not finite is skipped (params and
    # optimizer state kept); so is a finite update larger than `max_update_ratio` times the
    # params' norm (a blow-up, e.g. a learning rate off by orders of magnitude; 0 = no bound).
    c.guard = ml_collections.ConfigDict()
    c.guard.max_update_ratio = 1.0
    c.guard.max_consecutive_skipped = 10  # abort the run (non-zero exit) after this many

    # --- Checkpoints, evaluation, logging ------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # save every N steps (and at the end of each stage)
    c.checkpoint.keep = 2  # recent checkpoints kept per stage
    c.checkpoint.async_save = True  # write in the background while training continues
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 100  # held-out evaluation every N steps (and at the end)
    c.eval.max_batches = 0  # 0 = the whole held-out set
    # DPO stage: sample the held-out prompts, score them (reward, KL to the reference, win
    # rate vs chosen) every `eval.generate.every_steps` steps (0 = off); see train/generation
    c.eval.generate = generation_config()
    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10  # metrics to JSONL/TensorBoard every N steps
    c.log.progress_bar = True  # tqdm bar with loss, accuracy, tokens/s, ETA
    c.log.wandb_project = ""  # Weights & Biases project; empty = off
    c.export_hf = True  # write the final policy as a Hugging Face directory <workdir>/hf

    # --- Sweeps --------------------------------------------------------------------------
    # A list of {dotted.field: value} overrides; `--sweep_index=i` runs member i in
    # <workdir>/sweep_<i>, `--sweep_index=-1` runs all of them one after another.
    c.sweep = ()
    return c


def shrink_to_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns any config into its seconds-long CPU variant (the `:tiny` mode tests reuse).

    Keeps the stages, loss and optimizer kinds of the config; swaps in the self-generated
    toy data, a tiny random model and a handful of steps.
    """
    c.model.hf_path = ""
    c.model.preset = "tiny"
    c.data.synthetic = True
    c.data.synthetic_size = 256
    c.data.eval_fraction = 0.25
    c.data.train_files = ()
    c.data.eval_files = ()
    c.data.sft_files = ()
    c.data.tfds_name = ""
    c.data.tokenizer = ""
    c.data.format = "auto"
    c.data.truncation_mode = "keep_start"
    c.data.max_length = 32
    c.data.max_prompt_length = 16
    c.data.pad_to_multiple_of = 32
    for stage in (c.sft, c.dpo, c.rm, c.ppo):
        stage.steps = min(stage.steps, 6) if stage.steps else 0
        stage.batch_size = 8
        stage.optimizer.warmup_steps = 2
        stage.optimizer.learning_rate = 1e-3
    c.dpo.init_from = "sft" if "sft" in c.stages else "model"
    c.rm.init_from = c.dpo.init_from
    c.ppo.init_from = c.dpo.init_from
    c.ppo.max_new_tokens = 8
    c.checkpoint.every_steps = 2
    c.eval.every_steps = 3
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.export_hf = False
    return c
