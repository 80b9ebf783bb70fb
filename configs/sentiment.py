"""Controlled sentiment generation: the DPO paper's reward-KL frontier (Sec. 6.1, Fig. 2 left).

Given a 2-8 token prefix of a movie review, the policy should continue it positively; a
sentiment score of the review is the ground-truth reward. `experiments/sentiment/run.py`
runs the pipeline: corpus -> SFT on reviews -> 4 samples of the SFT model per training
prefix, scored, 6 ordered pairs each -> one training run per method and hyperparameter on
those pairs -> every `train.eval_every`-step checkpoint sampled on held-out prefixes (mean
reward, sequence-level KL to the SFT model) and Best-of-N from SFT -> results/.

    python experiments/sentiment/run.py --config=configs/sentiment.py:small \
      --workdir=/tmp/sentiment --results_dir=experiments/sentiment/results

ARG: 'small' (default; no download: a generated review corpus, a small Llama-style model
trained on it, VADER as the reward; 985 CPU-seconds: 8-17 minutes on 2 idle cores, 28 on
a shared one; experiments/sentiment/README.md) | 'quick' (README's quickstart: the small
setup cut to SFT and one DPO run, a few minutes) | 'full' (the paper: IMDb,
GPT-2 large, siebert/sentiment-roberta-large-english; for GPU/TPU, point it at local copies:
--config.corpus.train_path=/data/imdb/train.parquet --config.corpus.test_path=...
--config.model.hf_path=/models/gpt2-large --config.reward.path=/models/siebert) | 'tiny'
(a minute; the variant the tests run). The method sweep is `methods()` below.
"""

import ml_collections

from dpo_jax.train.defaults import optimizer_config

SIZES = ("small", "quick", "full", "tiny")


def methods(
    dpo_betas,
    unlikelihood_alphas,
    *,
    extras=True,
    ppo_kl_targets=(),
    ppo_rewards=("learned", "ground_truth"),
):
    """The training runs: one dict per method and hyperparameter (the paper's sweep).

    run: the run's name (its workdir under <workdir>/runs/); method: its label in the plot
    and table; hyperparameter: its sweep value as text; stage: the training stage (dpo, sft
    for Preferred-FT: SFT on the chosen side of the pairs, or ppo); loss: a name from
    dpo_jax.losses with its beta and other hyperparameters (ppo: `reward` learned | ground_truth
    and the adaptive controller's `kl_target` in nats). ppo_kl_targets: per target, a PPO run
    (reward model trained on the pairs) and a PPO-GT run (the ground-truth reward), as far as
    `ppo_rewards` lists them.
    """

    def run(name, method, hyperparameter, loss="", beta=0.1, stage="dpo", **hparams):
        return dict(
            run=name,
            method=method,
            hyperparameter=hyperparameter,
            stage=stage,
            loss=loss,
            beta=beta,
            hparams=hparams,
        )

    runs = [run(f"dpo_beta{b:g}", "DPO", f"beta={b:g}", "sigmoid", b) for b in dpo_betas]
    runs.append(run("preferred_ft", "Preferred-FT", "-", stage="sft"))
    runs += [
        run(f"unlikelihood_alpha{a:g}", "Unlikelihood", f"alpha={a:g}", "unlikelihood", alpha=a)
        for a in unlikelihood_alphas
    ]
    if extras:  # the loss family's later members on the same pairs
        runs += [
            # IPO's beta is tau: the log-ratio margin is regressed to 1 / (2 tau) = 5 nats.
            run("ipo_beta0.1", "IPO", "beta=0.1", "ipo", 0.1),
            # Conservative DPO: 10% of the labels assumed flipped.
            run("cdpo_eps0.1", "cDPO", "beta=0.1,eps=0.1", "sigmoid", 0.1, label_smoothing=0.1),
            # SimPO: beta 2, margin gamma 1 (gamma / beta = 0.5, inside the paper's range).
            run("simpo_beta2", "SimPO", "beta=2,gamma=1", "simpo", 2.0, simpo_gamma=1.0),
        ]
    ppo = {"learned": ("ppo", "PPO"), "ground_truth": ("ppo_gt", "PPO-GT")}
    for target in ppo_kl_targets:
        for reward in ppo_rewards:
            name, method = ppo[reward]
            hparam = f"target KL={target:g}"
            runs.append(
                run(
                    f"{name}_kl{target:g}",
                    method,
                    hparam,
                    stage="ppo",
                    reward=reward,
                    kl_target=float(target),
                )  # fmt: skip
            )
    return tuple(runs)


def get_config(arg=None):
    arg = arg or "small"
    if arg not in SIZES:
        raise ValueError(f"unknown sentiment variant {arg!r}; use one of {SIZES}")
    c = ml_collections.ConfigDict()
    c.size = arg
    c.seed = 0  # corpus, prefixes, init, data order, sampling keys: one seed for everything

    # --- Corpus ------------------------------------------------------------------------------
    c.corpus = ml_collections.ConfigDict()
    c.corpus.source = "generated"  # generated (dpo_jax.data.reviews) | imdb (local files)
    c.corpus.num_train = 6000  # generated: training reviews (SFT text, training prefixes)
    c.corpus.num_test = 600  # generated: held-out reviews (evaluation prefixes)
    c.corpus.vocab_size = 2048  # generated: the corpus tokenizer's vocabulary
    c.corpus.train_path = ""  # imdb: parquet file/dir or TFDS spec of the train split
    c.corpus.test_path = ""  # imdb: the same for the test split

    # --- Model (the SFT stage's starting point) --------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""  # a local Hugging Face model (full: GPT-2 large); else the preset
    c.model.preset = "tiny"  # random init, sized by `overrides` and the corpus tokenizer
    c.model.overrides = ml_collections.ConfigDict(
        dict(
            num_layers=2,
            hidden_size=128,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            mlp_dim=384,
            max_position_embeddings=160,
        )
    )
    c.model.dtype = "float32"

    # --- SFT on the reviews ------------------------------------------------------------------
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 500
    c.sft.batch_size = 32
    # Review tokens trained on: the start of each review, which is all the experiment samples
    # (a prefix of <= 8 tokens and 24 new ones); the rest of a review is cut.
    c.sft.max_length = 48
    c.sft.optimizer = optimizer_config(
        name="adamw", learning_rate=3e-3, warmup_steps=30, schedule="cosine", max_grad_norm=1.0
    )

    # --- Prefixes and preference pairs -------------------------------------------------------
    c.prefix = ml_collections.ConfigDict()
    c.prefix.min_tokens = 2  # the paper's prefixes: 2-8 tokens of a review
    c.prefix.max_tokens = 8
    c.pairs = ml_collections.ConfigDict()
    c.pairs.num_prefixes = 1000  # training prefixes (from the train split)
    c.pairs.samples_per_prefix = 4  # 4 samples -> 6 ordered pairs (chosen = higher reward)
    c.pairs.temperature = 1.0
    c.pairs.max_new_tokens = 24
    c.pairs.batch_size = 125  # prompts per sampler call

    # --- Ground-truth reward -----------------------------------------------------------------
    c.reward = ml_collections.ConfigDict()
    c.reward.name = "vader"  # vader: (compound + 1) / 2 | classifier: a local HF classifier
    c.reward.path = ""  # classifier directory
    c.reward.label = "POSITIVE"  # classifier: the class whose probability is the reward
    c.reward.batch_size = 32  # classifier: texts per forward
    c.reward.device = "cpu"  # classifier: torch device

    # --- Training runs on the pairs (shared by every method) --------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.steps = 160
    c.train.batch_size = 32  # pairs (Preferred-FT: chosen responses) per step
    c.train.eval_every = 40  # K: checkpoint (and evaluate on held-out prefixes) every K steps
    c.train.max_length = 36  # BOS + prefix (<= 8) + completion (<= 24) + EOS fit in 34
    c.train.max_prompt_length = 16
    c.train.held_out_fraction = 0.05  # of the pairs, for the runs' own held-out loss/accuracy
    # One optimizer for every method (the paper tunes none per baseline). The paper's
    # RMSprop at 1e-6 is for GPT-2 large; a 1M-parameter model needs a larger step.
    c.train.optimizer = optimizer_config(
        name="adamw", learning_rate=3e-4, warmup_steps=10, schedule="constant", max_grad_norm=1.0
    )
    # PPO runs (stage ppo): train.steps iterations of train.batch_size prompts each, with the
    # runs' optimizer, at the paper's target KLs (3, 6, 9, 12 nats), on a reward model
    # trained on the same pairs (PPO) and on the ground-truth reward (PPO-GT).
    c.methods = methods(
        dpo_betas=(0.05, 0.1, 1.0, 5.0),
        unlikelihood_alphas=(0.05, 0.1, 0.5, 1.0),
        ppo_kl_targets=(3.0, 6.0, 9.0, 12.0),
    )
    c.ppo = ml_collections.ConfigDict()
    c.ppo.rm_steps = 160  # learned reward: Bradley-Terry steps on the pairs, from SFT
    c.ppo.epochs = 4  # passes over each rollout batch
    c.ppo.num_minibatches = 1  # updates per pass
    c.ppo.kl_coef = 0.05  # initial beta_KL (then adapted toward the run's target KL)
    # The policy's learning rate in PPO (the reward model trains with train.optimizer's).
    # A tenth of the other methods': at their 3e-4 (4 epochs per rollout batch) every PPO
    # run passed KL 8-19 by its first checkpoint, faster than the controller could react,
    # and no PPO point lay below KL 8 (the first committed PPO run, README); at 3e-5 the
    # runs cross KL 0-12 over the 160 iterations. The only PPO setting chosen by trying.
    c.ppo.learning_rate = 3e-5
    # Samples over which beta_KL moves by at most 20% (Ziegler et al.'s controller). TRL's
    # 10000 is for runs of 10^5+ samples: over this run's 160 x 32 = 5120 it moves beta_KL by
    # under 10% (measured: targets 3-12 all ended at 0.053-0.055, KL 12-20), i.e. no
    # control; 256 lets it move by up to 2.5% per iteration.
    c.ppo.kl_horizon = 256

    # --- Evaluation on held-out prefixes -----------------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 256  # held-out prefixes (test split)
    c.eval.samples_per_prompt = 1
    c.eval.temperature = 1.0  # the paper's sampling temperature
    c.eval.batch_size = 128  # prompts per sampler call
    c.eval.kl_batch_size = 128  # sequences per teacher-forced SFT (reference) forward
    c.eval.best_of_n = (4, 16, 64)  # Best-of-N from SFT, the reward picks: an oracle
    c.eval.best_of_n_prompts = 64  # held-out prefixes for Best-of-N (max N samples each)
    c.eval.kl_buckets = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # table.md's KL edges

    if arg == "full":
        _full(c)
    elif arg == "quick":
        _quick(c)
    elif arg == "tiny":
        shrink_to_tiny(c)
    c.lock()
    return c


def _quick(c):
    """README's quickstart: the small experiment cut to SFT and one DPO run (beta 0.1), a few
    minutes on 2 CPU cores; it prints the SFT model's and the DPO policy's mean reward and
    KL. Same corpus, model, reward and evaluation as 'small', fewer reviews and steps."""
    c.corpus.num_train = 3000
    c.corpus.num_test = 256
    c.sft.steps = 300
    c.pairs.num_prefixes = 500
    c.train.steps = 120
    c.train.eval_every = 60
    c.methods = methods(dpo_betas=(0.1,), unlikelihood_alphas=(), extras=False)
    c.methods = tuple(m for m in c.methods if m["method"] == "DPO")
    c.eval.best_of_n = (4, 16)
    c.eval.best_of_n_prompts = 32


def _full(c):
    """The paper's setup (Rafailov et al. 2023, Sec. 6.1 and App. C.1)."""
    c.corpus.source = "imdb"
    c.model.hf_path = ""  # required: a local copy of gpt2-large (the command line sets it)
    c.model.preset = ""
    c.model.overrides = ml_collections.ConfigDict()
    c.sft.steps = 2000
    c.sft.batch_size = 64
    c.sft.max_length = 256
    # The reference code's SFT optimizer (configs/sft.py).
    c.sft.optimizer = optimizer_config(name="rmsprop", learning_rate=5e-7, warmup_steps=150)
    c.pairs.num_prefixes = 20000
    c.pairs.max_new_tokens = 48
    c.pairs.batch_size = 64
    c.reward.name = "classifier"
    c.reward.path = ""  # required: siebert/sentiment-roberta-large-english, a local copy
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.eval_every = 100
    c.train.max_length = 64
    c.train.max_prompt_length = 16
    # The paper's DPO optimizer (configs/imdb_gpt2_large.py).
    c.train.optimizer = optimizer_config(name="rmsprop", learning_rate=1e-6, warmup_steps=150)
    c.ppo.kl_horizon = 10000  # TRL's default: 1000 iterations x 64 samples
    c.ppo.learning_rate = 1e-6  # the DPO runs' (the paper's PPO learning rate is not given)
    c.eval.num_prompts = 512
    c.eval.samples_per_prompt = 1
    c.eval.batch_size = 64
    c.eval.kl_batch_size = 32
    c.eval.best_of_n_prompts = 256


def shrink_to_tiny(c):
    """Seconds on a CPU: a few reviews, a 1-layer model (unless `model.hf_path` is set), two
    methods, a few steps. The tests apply it to 'full' too, with tiny stand-in models."""
    c.corpus.num_train = 64
    c.corpus.num_test = 16
    c.corpus.vocab_size = 320
    if not c.model.hf_path:
        c.model.overrides = ml_collections.ConfigDict(
            dict(
                num_layers=1,
                hidden_size=32,
                num_heads=2,
                num_kv_heads=1,
                head_dim=16,
                mlp_dim=64,
                max_position_embeddings=64,
            )
        )
    c.sft.steps = 60  # enough to emit words (and so sentiment) instead of byte noise
    c.sft.batch_size = 16
    c.sft.max_length = 32
    c.sft.optimizer = optimizer_config(
        name="adamw", learning_rate=1e-2, warmup_steps=2, schedule="cosine", max_grad_norm=1.0
    )
    c.pairs.num_prefixes = 48
    c.pairs.max_new_tokens = 16
    c.pairs.batch_size = 48
    c.train.steps = 4
    c.train.batch_size = 8  # divisible by the tests' 8 fake devices
    c.train.eval_every = 2
    c.train.max_length = 32
    c.train.max_prompt_length = 12
    c.train.held_out_fraction = 0.2
    c.train.optimizer.warmup_steps = 1
    # One PPO run per path, to keep the tests short: PPO on its reward model (generated
    # corpus), PPO-GT on the classifier (the full configuration's path).
    generated = c.corpus.source == "generated"
    c.methods = methods(
        dpo_betas=(0.1,),
        unlikelihood_alphas=(),
        extras=False,
        ppo_kl_targets=(3.0,),
        ppo_rewards=("learned",) if generated else ("ground_truth",),
    )
    c.ppo.rm_steps = 4
    c.ppo.epochs = 2
    c.eval.num_prompts = 8
    c.eval.batch_size = 8
    c.eval.kl_batch_size = 8
    c.eval.best_of_n = (2, 4)
    c.eval.best_of_n_prompts = 4
