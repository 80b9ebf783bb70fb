"""Controlled sentiment generation, end to end: the DPO paper's reward-KL frontier (Fig. 2 left).

    python experiments/sentiment/run.py --config=configs/sentiment.py:small \
      --workdir=/tmp/sentiment --results_dir=experiments/sentiment/results
    ... --stage=corpus|sft|pairs|train|evaluate|report     (one stage; the earlier ones done)

Stages, in order (configs/sentiment.py sets every size):
  corpus    reviews (generated, or IMDb text from local files) as SFT records; review
            prefixes of 2-8 tokens from the train split (training prompts) and the test
            split (held-out prompts), each with the rest of its review.
  sft       the base model fine-tuned on the training reviews (`dpo_jax.train.loop`,
            stage sft), exported to <workdir>/sft/hf: the reference of everything after.
  pairs     4 samples of the SFT model per training prefix (temperature 1), scored by the
            ground-truth reward; the 6 ordered pairs per prefix (chosen = higher reward,
            ties dropped) as a preference JSONL, plus every sample with its reward.
  train     one run per method and hyperparameter (`config.methods`), each in its own loop
            workdir <workdir>/runs/<run>, from the SFT model, on the same pairs,
            checkpointed every K = `train.eval_every` steps (PPO: iterations on the pairs'
            prompts, after a reward model trained on the pairs for PPO, not for PPO-GT).
  evaluate  the SFT model and every checkpoint sample the held-out prefixes: mean reward and
            sequence-level KL(policy || SFT) with standard errors; Best-of-N from SFT.
  report    results/frontier.csv, frontier.png, table.md, samples/*.jsonl.gz, timings.json.

Rerunning the command resumes: a finished stage, training run or evaluated checkpoint is
skipped (each training run also resumes inside itself from its checkpoints), and a workdir
made with another config is refused. The reward is VADER's compound sentiment of the review
(prefix + completion) mapped to [0, 1] (`small`), or a classifier's P(positive) (`full`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpo_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # frontier.py (the report) lives beside this script
    sys.path.insert(0, _HERE)
import frontier  # noqa: E402

STAGES = ("corpus", "sft", "pairs", "train", "evaluate", "report")
CSV_COLUMNS = (
    "run",
    "method",
    "hyperparameter",
    "step",
    "reward",
    "reward_stderr",
    "kl",
    "kl_stderr",
)
BEST_OF_N = "Best-of-N (oracle)"
BEST_OF_N_RM = "Best-of-N (learned RM)"

# Named for the package, so that the console filter of dpo_jax.cli shows its lines.
log = logging.getLogger("dpo_jax.experiments.sentiment")


# ------------------------------------------------------------------------------------------
# Workdir layout, stage bookkeeping
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes (module docstring), under `workdir`; results apart."""

    workdir: str
    results: str

    def at(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    @property
    def corpus(self) -> str:
        return self.at("corpus")

    @property
    def prefixes_train(self) -> str:
        return self.at("corpus", "prefixes_train.jsonl")

    @property
    def prefixes_test(self) -> str:
        return self.at("corpus", "prefixes_test.jsonl")

    @property
    def sft(self) -> str:
        return self.at("sft")

    @property
    def sft_hf(self) -> str:
        return self.at("sft", "hf")

    @property
    def pairs(self) -> str:
        return self.at("pairs")

    def run(self, name: str) -> str:
        return self.at("runs", name)

    def evaluation(self, name: str) -> str:
        return self.at("eval", name)


def done_marker(p: Paths, name: str) -> str:
    return p.at("done", name + ".json")


def is_done(p: Paths, name: str) -> bool:
    return os.path.isfile(done_marker(p, name))


def mark_done(p: Paths, name: str, seconds: float, **info) -> None:
    """Records that `name` (a stage or a training run) finished, and how long it took."""
    write_json(done_marker(p, name), {"seconds": round(seconds, 1), **info})


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)  # a reader (or a resumed run) never sees half a file


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def claim_workdir(config: ml_collections.ConfigDict, p: Paths) -> None:
    """Writes the experiment config on the first start; refuses a rerun whose config differs
    (the stages it finished would silently mix two experiments)."""
    path = p.at("experiment.json")
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if not os.path.isfile(path):
        write_json(path, current)
        return
    before, now = flatten(read_json(path)), flatten(current)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise ValueError(
            f"{p.workdir} holds an experiment with another config ({path}); differing keys: "
            f"{', '.join(changed[:8])}. Use a new --workdir."
        )


def flatten(tree, prefix: str = "") -> dict:
    """{"a.b": value} of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {
        k: v
        for key, sub in tree.items()
        for k, v in flatten(sub, f"{prefix}.{key}".lstrip(".")).items()
    }


# ------------------------------------------------------------------------------------------
# Ground-truth reward
# ------------------------------------------------------------------------------------------


class UnitVader:
    """VADER's compound sentiment of prefix + completion (the review as a reader sees it),
    mapped from [-1, 1] to [0, 1]: `(compound + 1) / 2`."""

    def __init__(self):
        from dpo_jax.evaluation.rewards import VaderSentiment

        self._vader = VaderSentiment(with_prompt=True)

    def __call__(self, prompts, completions) -> np.ndarray:
        return (self._vader(prompts, completions) + 1.0) / 2.0


def build_reward(config):
    """`reward(prompts, completions) -> [N]` in [0, 1]: VADER, or the classifier's
    probability of `reward.label` (the paper: siebert/sentiment-roberta-large-english)."""
    r = config.reward
    if r.name == "vader":
        return UnitVader()
    if r.name == "classifier":
        from dpo_jax.evaluation.rewards import HFClassifierReward

        return HFClassifierReward(
            r.path,
            label=r.label,
            score="prob",
            with_prompt=True,
            batch_size=r.batch_size,
            device=r.device,
        )
    raise ValueError(f"config.reward.name={r.name!r}; expected 'vader' or 'classifier'")


# ------------------------------------------------------------------------------------------
# Stage 1: corpus and prefixes
# ------------------------------------------------------------------------------------------


def corpus_files(config, p: Paths) -> tuple[str, str, str]:
    """(train JSONL, test JSONL, tokenizer directory) of the corpus."""
    if config.corpus.source == "generated":
        return tuple(os.path.join(p.corpus, f) for f in ("train.jsonl", "test.jsonl", "tokenizer"))
    if config.corpus.source == "imdb":
        train, test = (os.path.join(p.corpus, f) for f in ("train.jsonl", "test.jsonl"))
        return train, test, config.model.hf_path
    raise ValueError(f"config.corpus.source={config.corpus.source!r}; expected generated | imdb")


def write_corpus(config, p: Paths) -> None:
    """The reviews as SFT records {"prompt": "", "completion": review}."""
    c = config.corpus
    if c.source == "generated":
        from dpo_jax.data import reviews

        reviews.write_review_corpus(
            p.corpus, c.num_train, c.num_test, config.seed, vocab_size=c.vocab_size
        )
        return
    from dpo_jax.data import review_text

    train, test, _ = corpus_files(config, p)
    for path, source in ((train, c.train_path), (test, c.test_path)):
        texts = review_text.read_review_texts(source)
        write_jsonl(path, ({"prompt": "", "completion": t} for t in texts))


def review_prefixes(texts, tokenizer, count: int, min_tokens: int, max_tokens: int, seed: int):
    """Prefix records of `count` reviews in a seeded order: {"prompt": the text of the
    review's first k tokens, k uniform in [min_tokens, max_tokens], "completion": the rest of
    the review, "review": its index}. Reviews with nothing after the prefix are skipped."""
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(texts)):
        if len(out) == count:
            break
        text = texts[i]
        ids = tokenizer.encode(text, add_special_tokens=False)
        k = int(rng.integers(min_tokens, max_tokens + 1))
        prefix = tokenizer.decode(ids[:k])
        # Byte-level BPE decodes a token run to exactly that run of the text; others may not.
        rest = text[len(prefix) :] if text.startswith(prefix) else tokenizer.decode(ids[k:])
        if len(ids) > k and rest.strip():
            out.append({"prompt": prefix, "completion": rest, "review": int(i)})
    if len(out) < count:
        raise ValueError(f"only {len(out)} of {len(texts)} reviews give a prefix; need {count}")
    return out


def stage_corpus(config, p: Paths) -> None:
    from dpo_jax.data.tokenize import load_tokenizer

    write_corpus(config, p)
    train, test, tokenizer_dir = corpus_files(config, p)
    tokenizer = load_tokenizer(tokenizer_dir)
    c = config.prefix
    for path, source, count, seed in (
        (p.prefixes_train, train, config.pairs.num_prefixes, config.seed),
        (p.prefixes_test, test, config.eval.num_prompts, config.seed + 1),
    ):
        texts = [r["completion"] for r in read_jsonl(source)]
        write_jsonl(
            path, review_prefixes(texts, tokenizer, count, c.min_tokens, c.max_tokens, seed)
        )


# ------------------------------------------------------------------------------------------
# Stage 2: SFT on the reviews
# ------------------------------------------------------------------------------------------


def base_run_config(config, stage: str):
    """The loop config fields every training run of the experiment shares."""
    from dpo_jax.train.defaults import base_config

    c = base_config()
    c.seed = config.seed
    c.stages = (stage,)
    c.model.dtype = config.model.dtype
    # The checkpoints are results here (each is a frontier point): written before training
    # goes on, as they are small next to the K steps between them.
    c.checkpoint.async_save = False
    c.log.every_steps = 10
    return c


def sft_run_config(config, p: Paths):
    from dpo_jax.train.defaults import optimizer_config

    c = base_run_config(config, "sft")
    train, _, tokenizer_dir = corpus_files(config, p)
    if config.model.hf_path:
        c.model.hf_path = config.model.hf_path
    else:
        c.model.preset = config.model.preset
        c.model.overrides = ml_collections.ConfigDict(config.model.overrides.to_dict())
    c.data.train_files = (train,)
    c.data.tokenizer = tokenizer_dir
    c.data.max_length = config.sft.max_length
    c.data.max_prompt_length = 1  # the prompt is empty: BOS at most
    c.data.pad_to_multiple_of = config.sft.max_length  # one shape, one compilation
    c.sft.steps = config.sft.steps
    c.sft.batch_size = config.sft.batch_size
    c.sft.optimizer = optimizer_config(**config.sft.optimizer.to_dict())
    c.checkpoint.every_steps = max(config.sft.steps // 4, 1)
    return c


def stage_sft(config, p: Paths) -> None:
    from dpo_jax.train import loop

    loop.run(sft_run_config(config, p), p.sft)


# ------------------------------------------------------------------------------------------
# Stage 3: sample, score, pair
# ------------------------------------------------------------------------------------------


def prompt_config(max_prompts: int, max_new_tokens: int):
    """What `evaluation.inputs.load_prompts` reads: prefixes tokenized as in training."""
    c = ml_collections.ConfigDict()
    c.prompts = dict(
        format="auto",
        max_prompts=max_prompts,
        max_prompt_length=16,
        truncation_mode="keep_start",
        tokenize_mode="reference",
    )
    c.sampling = dict(max_new_tokens=max_new_tokens)
    return c


def sampling_setup(
    tokenizer,
    prompts,
    reward,
    *,
    num_samples,
    batch_size,
    max_new_tokens,
    reference=None,
    kl_batch_size=32,
):
    """An `evaluation.run.Setup`: what `evaluate_one` samples and scores a policy against."""
    from dpo_jax.evaluation import options
    from dpo_jax.evaluation.run import Setup

    c = ml_collections.ConfigDict()
    c.sampling = options.sampling_config()
    c.sampling.update(
        dict(num_samples=num_samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    )
    c.kl_batch_size = kl_batch_size
    # Each prefix's own review continuation, scored once (win rate vs the human text).
    chosen_rewards = np.asarray(reward(prompts.texts, prompts.chosen))
    # beta 0.1: only the implicit-reward column of evaluate_one uses it, which we do not read.
    return Setup(c, tokenizer, prompts, reference, reward, chosen_rewards, 0.1, None, None)


def ordered_pairs(prompt: str, samples: list[dict]) -> tuple[list[dict], dict]:
    """The ordered pairs of one prefix's samples: every two samples with different rewards,
    the higher-reward one chosen (4 samples -> up to 6 pairs). Empty completions are dropped
    first (there is nothing to train on); ties (equal rewards, e.g. two identical texts)
    carry no preference and are dropped. Returns (pair records, counts)."""
    kept = [s for s in samples if s["completion"].strip()]
    pairs, ties = [], 0
    for i in range(len(kept)):
        for j in range(i + 1, len(kept)):
            a, b = kept[i], kept[j]
            if a["reward"] == b["reward"]:
                ties += 1
                continue
            chosen, rejected = (a, b) if a["reward"] > b["reward"] else (b, a)
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen["completion"],
                    "rejected": rejected["completion"],
                    "chosen_reward": chosen["reward"],
                    "rejected_reward": rejected["reward"],
                }
            )
    return pairs, {"empty": len(samples) - len(kept), "ties": ties}


def stage_pairs(config, p: Paths) -> None:
    from tqdm import tqdm

    from dpo_jax import models
    from dpo_jax.data.tokenize import load_tokenizer
    from dpo_jax.evaluation import inputs as eval_inputs
    from dpo_jax.evaluation.run import evaluate_one

    c = config.pairs
    model, params = models.from_hf(p.sft_hf, dtype=config.model.dtype)
    tokenizer = load_tokenizer(p.sft_hf)
    prompts = eval_inputs.load_prompts(
        prompt_config(0, c.max_new_tokens), tokenizer, [p.prefixes_train]
    )
    reward = build_reward(config)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    samples = []
    for start in tqdm(range(0, len(prompts.ids), c.batch_size), desc="pairs: sample + score"):
        chunk = eval_inputs.Prompts(
            *(x[start : start + c.batch_size] for x in (prompts.ids, prompts.texts, prompts.chosen))
        )
        setup = sampling_setup(
            tokenizer,
            chunk,
            reward,
            num_samples=c.samples_per_prefix,
            batch_size=c.batch_size,
            max_new_tokens=c.max_new_tokens,
        )
        _, rows, _ = evaluate_one(
            setup, "sft", model, params, c.temperature, jax.random.fold_in(key, start)
        )
        samples += [dict(r, prompt_index=r["prompt_index"] + start) for r in rows]
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    counts = {"prefixes": len(by_prompt), "samples": len(samples), "empty": 0, "ties": 0}
    per_prefix = []
    for i, group in sorted(by_prompt.items()):
        pairs, dropped = ordered_pairs(prompts.texts[i], group)
        counts = {k: counts[k] + dropped.get(k, 0) for k in counts}
        if pairs:
            per_prefix.append(pairs)
    # Held-out pairs (the runs' own loss and accuracy) come from the last prefixes that gave
    # pairs, never from a prefix trained on.
    num_held_out = max(1, int(len(per_prefix) * config.train.held_out_fraction))
    if len(per_prefix) <= num_held_out:
        raise ValueError(
            f"pairs: only {len(per_prefix)} prefixes gave pairs ({counts}); "
            "sample more prefixes (config.pairs.num_prefixes)"
        )
    split = {
        "train": sum(per_prefix[:-num_held_out], []),
        "held_out": sum(per_prefix[-num_held_out:], []),
    }
    for name, records in split.items():
        write_jsonl(os.path.join(p.pairs, name + ".jsonl"), records)
        counts[name + "_pairs"] = len(records)
    write_jsonl(os.path.join(p.pairs, "samples.jsonl"), samples)
    rewards = np.array([s["reward"] for s in samples])
    counts["sample_reward_mean"] = float(rewards.mean())
    write_json(os.path.join(p.pairs, "summary.json"), counts)
    log.info("pairs: %s", counts)


# ------------------------------------------------------------------------------------------
# Stage 4: one training run per method and hyperparameter
# ------------------------------------------------------------------------------------------


def method_run_config(config, p: Paths, method: dict):
    """The loop config of one method's run: from the SFT export, on the pairs."""
    from dpo_jax.train.defaults import optimizer_config

    c = base_run_config(config, method["stage"])
    t = config.train
    c.model.hf_path = p.sft_hf  # with its tokenizer
    c.data.train_files = (os.path.join(p.pairs, "train.jsonl"),)
    c.data.eval_files = (os.path.join(p.pairs, "held_out.jsonl"),)
    c.data.max_length = t.max_length
    c.data.max_prompt_length = t.max_prompt_length
    c.data.pad_to_multiple_of = t.max_length
    stage = c[method["stage"]]
    stage.steps = t.steps
    stage.batch_size = t.batch_size
    stage.optimizer = optimizer_config(**t.optimizer.to_dict())
    if method["stage"] == "dpo":
        c.dpo.init_from = "model"
        c.dpo.loss.name = method["loss"]
        c.dpo.loss.beta = float(method["beta"])
        for name, value in method["hparams"].items():
            c.dpo.loss.hparams[name] = value
    if method["stage"] == "ppo":
        ppo_run_fields(config, c, method)
    # Every K-step checkpoint is kept: each is a point on the frontier.
    c.checkpoint.every_steps = t.eval_every
    c.checkpoint.keep = t.steps // t.eval_every + 1
    # The runs' own held-out loss and accuracy at the start and the end only: the frontier's
    # points are the evaluate stage's.
    c.eval.every_steps = t.steps
    c.export_hf = False
    return c


def ppo_run_fields(config, c, method: dict) -> None:
    """A PPO run from the SFT export on the pairs' prompts: `learned` trains a reward model on
    the pairs first (stages rm, ppo; it also starts the value model), `ground_truth` scores
    the rollouts with the experiment's reward (VADER's compound of prefix + completion in
    [-1, 1], i.e. 2x the reported [0, 1] reward minus 1; or the classifier's P(label))."""
    from dpo_jax.train.defaults import optimizer_config

    t, hparams = config.train, method["hparams"]
    c.ppo.init_from = "model"
    c.ppo.max_new_tokens = config.pairs.max_new_tokens
    c.ppo.epochs = config.ppo.epochs
    c.ppo.num_minibatches = config.ppo.num_minibatches
    c.ppo.kl_coef = config.ppo.kl_coef
    c.ppo.kl_horizon = config.ppo.kl_horizon
    c.ppo.kl_target = hparams["kl_target"]
    c.ppo.optimizer.learning_rate = config.ppo.learning_rate
    c.ppo.reward = hparams["reward"]
    if hparams["reward"] == "learned":
        c.stages = ("rm", "ppo")
        c.rm.init_from = "model"
        c.rm.steps = config.ppo.rm_steps
        c.rm.batch_size = t.batch_size
        c.rm.optimizer = optimizer_config(**t.optimizer.to_dict())
        return
    gt, r = c.ppo.ground_truth, config.reward
    gt.with_prompt = True
    gt.name = r.name
    if r.name == "classifier":
        gt.path, gt.label, gt.score = r.path, r.label, "prob"
        gt.batch_size, gt.device = r.batch_size, r.device


def stage_train(config, p: Paths) -> None:
    from tqdm import tqdm

    from dpo_jax.train import loop

    for method in tqdm(config.methods, desc="train: runs"):
        name = "train_" + method["run"]
        if is_done(p, name):
            continue
        start, cpu = time.time(), time.process_time()
        loop.run(method_run_config(config, p, method), p.run(method["run"]))
        mark_done(p, name, time.time() - start, cpu_seconds=round(time.process_time() - cpu, 1))


# ------------------------------------------------------------------------------------------
# Stage 5: evaluation on held-out prefixes
# ------------------------------------------------------------------------------------------


def checkpoint_steps(p: Paths, method: dict) -> list[int]:
    from dpo_jax.evaluation.inputs import checkpoint_steps as steps_in

    return steps_in(os.path.join(p.run(method["run"]), "checkpoints", method["stage"]))


def frontier_row(run, method, hyperparameter, step, metrics: dict) -> dict:
    """A frontier.csv row from `evaluate_one` metrics (`*_mean`, `*_stderr`)."""
    return {
        "run": run,
        "method": method,
        "hyperparameter": hyperparameter,
        "step": step,
        "reward": metrics["reward_mean"],
        "reward_stderr": metrics["reward_stderr"],
        "kl": metrics["kl_mean"],
        "kl_stderr": metrics["kl_stderr"],
    }


def best_of_n_rows(
    rewards: np.ndarray, ns, picks: np.ndarray | None = None, method: str = BEST_OF_N
) -> list[dict]:
    """Best-of-N from `rewards` [P, M] (M samples of each of P prompts, M >= max(ns)).

    For each N the M samples of a prompt form M // N disjoint groups; a group's value is the
    reward of its sample with the highest `picks` score ([P, M]; default the reward itself:
    the oracle; the learned reward model's scores: the paper's Best-of-N). Reward = mean over
    prompts of the per-prompt mean over groups, stderr over prompts. KL(best-of-N || SFT) is
    the analytic log N - (N - 1) / N used since Stiennon et al. 2020 (arXiv 2009.01325), an
    upper bound on the true KL (Beirami et al. 2024, arXiv 2401.01879), with no sampling
    error; it holds for any picking score without ties.
    """
    picks = rewards if picks is None else picks
    suffix = "" if method == BEST_OF_N else "_rm"
    rows = []
    for n in ns:
        used = rewards.shape[1] // n * n
        groups = rewards[:, :used].reshape(rewards.shape[0], -1, n)
        best = picks[:, :used].reshape(groups.shape).argmax(axis=-1)[..., None]
        per_prompt = np.take_along_axis(groups, best, axis=-1)[..., 0].mean(axis=-1)
        stderr = float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)))
        metrics = {
            "reward_mean": float(per_prompt.mean()),
            "reward_stderr": stderr,
            "kl_mean": math.log(n) - (n - 1) / n,
            "kl_stderr": 0.0,
        }
        rows.append(frontier_row(f"best_of_{n}{suffix}", method, f"N={n}", 0, metrics))
    return rows


def learned_reward_run(config) -> dict | None:
    """The first PPO run on a learned reward: its `rm` stage's reward model (the same for
    every such run: same pairs, seed and steps) also picks the paper's Best-of-N."""
    ppo = (m for m in config.methods if m["stage"] == "ppo")
    return next((m for m in ppo if m["hparams"]["reward"] == "learned"), None)


def reward_model_scores(config, p: Paths, samples: list[dict], lm_config, tokenizer) -> np.ndarray:
    """The learned reward model's score [S] of each sample (prompt + completion text),
    tokenized as its `rm` stage tokenized the pairs (EOS appended, the run's truncation);
    -inf for a sample the tokenizer refuses (an empty completion), so that it is never
    picked over a real one. lm_config, tokenizer: the SFT model's, which the reward model's
    trunk shares."""
    from dpo_jax.data.batching import pad_sequences
    from dpo_jax.data.examples import RecordError, SFTExample
    from dpo_jax.data.tokenize import pad_id_of, tokenize_sequence
    from dpo_jax.evaluation import inputs as eval_inputs
    from dpo_jax.models import reward as reward_model
    from dpo_jax.train.inputs import data_tokenize_config

    method = learned_reward_run(config)
    data = method_run_config(config, p, method).data
    rm_dir = os.path.join(p.run(method["run"]), "checkpoints", "rm")
    last = eval_inputs.checkpoint_steps(rm_dir)[-1]
    params = eval_inputs.restore_params(os.path.join(rm_dir, str(last)))
    model = reward_model.RewardModel(reward_model.trunk_config(lm_config))
    tokenize = data_tokenize_config(data)
    seqs, valid = [], []
    for s in samples:
        try:
            seqs.append(
                tokenize_sequence(SFTExample(s["prompt"], s["completion"]), tokenizer, tokenize)
            )
            valid.append(True)
        except RecordError:
            valid.append(False)
    score = jax.jit(lambda rows: model.apply({"params": params}, *rows))
    batch_size, out = config.eval.kl_batch_size, []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        # One padded length and batch size for every batch: one compiled shape.
        rows = pad_sequences(chunk, max_length=data.max_length, pad_id=pad_id_of(tokenizer),
                             pad_to_multiple_of=data.max_length, batch_size=batch_size)  # fmt: skip
        fields = (rows["tokens"], rows["positions"], rows["segment_ids"])
        out.append(np.asarray(score(fields))[: len(chunk)])
    scores = np.full(len(samples), -np.inf)
    scores[np.array(valid, bool)] = np.concatenate(out) if out else []
    return scores


def save_evaluation(p: Paths, name: str, rows: list[dict], samples: list[dict]) -> None:
    """Samples first, rows last: the rows file marks the evaluation complete."""
    directory = p.evaluation(name)
    write_jsonl(os.path.join(directory, "samples.jsonl"), samples)
    write_json(os.path.join(directory, "rows.json"), rows)


def evaluated(p: Paths, name: str) -> bool:
    return os.path.isfile(os.path.join(p.evaluation(name), "rows.json"))


def stage_evaluate(config, p: Paths) -> None:
    from tqdm import tqdm

    from dpo_jax import models
    from dpo_jax.data.tokenize import load_tokenizer
    from dpo_jax.evaluation import inputs as eval_inputs
    from dpo_jax.evaluation.run import evaluate_one

    e = config.eval
    model, sft_params = models.from_hf(p.sft_hf, dtype=config.model.dtype)
    tokenizer = load_tokenizer(p.sft_hf)
    prompts = eval_inputs.load_prompts(
        prompt_config(e.num_prompts, config.pairs.max_new_tokens), tokenizer, [p.prefixes_test]
    )
    reward = build_reward(config)
    setup = sampling_setup(
        tokenizer,
        prompts,
        reward,
        num_samples=e.samples_per_prompt,
        batch_size=e.batch_size,
        max_new_tokens=config.pairs.max_new_tokens,
        reference=(model, sft_params),
        kl_batch_size=e.kl_batch_size,
    )
    # One key for every policy: checkpoints are compared on common random numbers.
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    jobs = [("sft", "SFT", "-", 0, None, "sft")]
    for m in config.methods:
        for step in checkpoint_steps(p, m):
            ckpt = os.path.join(p.run(m["run"]), "checkpoints", m["stage"], str(step))
            jobs.append((m["run"], m["method"], m["hyperparameter"], step, ckpt, m["stage"]))
    for run, method, hparam, step, ckpt, stage in tqdm(jobs, desc="evaluate: checkpoints"):
        name = f"{run}/step_{step}"
        if evaluated(p, name):
            continue
        # A PPO state's params are {"policy", "value"}: the policy's are read.
        params = sft_params if ckpt is None else eval_inputs.restore_policy_params(ckpt, stage)
        metrics, samples, _ = evaluate_one(
            setup, f"{run}@{step}", model, params, e.temperature, key
        )
        save_evaluation(p, name, [frontier_row(run, method, hparam, step, metrics)], samples)
    if not evaluated(p, "best_of_n"):
        k, most = e.best_of_n_prompts, max(e.best_of_n)
        few = eval_inputs.Prompts(prompts.ids[:k], prompts.texts[:k], prompts.chosen[:k])
        bon_setup = dataclasses.replace(
            setup,
            config=setup.config.copy_and_resolve_references(),
            prompts=few,
            reference=None,
            chosen_rewards=setup.chosen_rewards[:k],
        )
        with bon_setup.config.unlocked():
            bon_setup.config.sampling.num_samples = most
            bon_setup.config.sampling.batch_size = max(1, e.batch_size // most)
        _, samples, _ = evaluate_one(
            bon_setup, "sft_best_of_n", model, sft_params, e.temperature, key
        )
        rewards = np.array([s["reward"] for s in samples]).reshape(len(few.ids), most)
        save_evaluation(p, "best_of_n", best_of_n_rows(rewards, e.best_of_n), samples)
    if learned_reward_run(config) is not None and not evaluated(p, "best_of_n_rm"):
        # The same SFT samples, picked by the reward model the PPO runs optimise.
        samples = read_jsonl(os.path.join(p.evaluation("best_of_n"), "samples.jsonl"))
        scores = reward_model_scores(config, p, samples, model.config, tokenizer)
        shape = (len(samples) // max(e.best_of_n), max(e.best_of_n))
        rewards = np.array([s["reward"] for s in samples]).reshape(shape)
        rows = best_of_n_rows(rewards, e.best_of_n, scores.reshape(shape), BEST_OF_N_RM)
        scored = [
            {k: s[k] for k in ("prompt_index", "sample_index")} | {"rm_score": float(x)}
            for s, x in zip(samples, scores, strict=True)
        ]
        save_evaluation(p, "best_of_n_rm", rows, scored)


# ------------------------------------------------------------------------------------------
# Stage 6: report
# ------------------------------------------------------------------------------------------


def collect_rows(config, p: Paths) -> list[dict]:
    """Every frontier row, in order: SFT, each run by step, Best-of-N (oracle, learned RM)."""
    names = ["sft/step_0"]
    for m in config.methods:
        names += [f"{m['run']}/step_{s}" for s in checkpoint_steps(p, m)]
    names.append("best_of_n")
    if learned_reward_run(config) is not None:
        names.append("best_of_n_rm")
    rows = []
    for name in names:
        rows += read_json(os.path.join(p.evaluation(name), "rows.json"))
    return rows


def stage_report(config, p: Paths) -> None:
    rows = collect_rows(config, p)
    os.makedirs(p.results, exist_ok=True)
    frontier.write_csv(os.path.join(p.results, "frontier.csv"), rows, CSV_COLUMNS)
    frontier.plot_frontier(
        os.path.join(p.results, "frontier.png"), rows, title=config_title(config)
    )
    table = frontier.bucket_table(rows, config.eval.kl_buckets)
    dominance = frontier.dominance_table(rows)
    if dominance:
        table += "\nPareto dominance on the (KL, reward) plane:\n\n" + dominance
    with open(os.path.join(p.results, "table.md"), "w") as f:
        f.write(table)
    samples_dir = os.path.join(p.results, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    runs = ["sft", *(m["run"] for m in config.methods)]
    for run in runs:
        directory = p.evaluation(run)
        steps = sorted(int(d.split("_")[1]) for d in os.listdir(directory) if d.startswith("step_"))
        records = []
        for step in steps:
            records += read_jsonl(os.path.join(directory, f"step_{step}", "samples.jsonl"))
        write_gzip_jsonl(os.path.join(samples_dir, f"{run}.jsonl.gz"), records)
    bon = read_jsonl(os.path.join(p.evaluation("best_of_n"), "samples.jsonl"))
    write_gzip_jsonl(os.path.join(samples_dir, "best_of_n.jsonl.gz"), bon)
    if learned_reward_run(config) is not None:  # the reward model's score of each of them
        scores = read_jsonl(os.path.join(p.evaluation("best_of_n_rm"), "samples.jsonl"))
        write_gzip_jsonl(os.path.join(samples_dir, "best_of_n_rm_scores.jsonl.gz"), scores)
    pairs = read_jsonl(os.path.join(p.pairs, "samples.jsonl"))
    write_gzip_jsonl(os.path.join(samples_dir, "pairs_sft_samples.jsonl.gz"), pairs)
    print(table, flush=True)
    print(final_summary(rows), flush=True)


def final_summary(rows: list[dict]) -> str:
    """Each trained run's last evaluated checkpoint next to the SFT model it started from."""
    last = {}
    for row in rows:
        best_of_n = row["method"].startswith("Best-of-N")
        if not best_of_n and row["step"] >= last.get(row["run"], row)["step"]:
            last[row["run"]] = row
    lines = ["Held-out prefixes, mean ground-truth reward and KL(policy || SFT), +- stderr:"]
    for row in last.values():
        hparam = "" if row["hyperparameter"] == "-" else row["hyperparameter"]
        name = "SFT" if row["run"] == "sft" else f"{row['method']} {hparam}"
        lines.append(
            f"  {name:<26} step {row['step']:>4}   reward {row['reward']:.3f} +- "
            f"{row['reward_stderr']:.3f}   KL {round(row['kl'], 2) + 0.0:6.2f} +- "
            f"{row['kl_stderr']:.2f}"  # + 0.0: the SFT row's -1e-7 prints as 0.00, not -0.00
        )
    return "\n".join(lines)


def config_title(config) -> str:
    t = config.eval.temperature
    return f"controlled sentiment ({config.size}): reward vs KL(policy || SFT), T={t:g}"


def write_gzip_jsonl(path: str, records) -> None:
    """Gzipped JSONL with a fixed header timestamp: the same records give the same bytes."""
    with open(path + ".tmp", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------

STAGE_FUNCTIONS = {
    "corpus": stage_corpus,
    "sft": stage_sft,
    "pairs": stage_pairs,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def check_inputs(config) -> None:
    """The local files a configuration needs, named before anything runs."""
    needed = []
    if config.corpus.source == "imdb":
        needed += [("corpus.train_path", "IMDb train reviews"), ("corpus.test_path", "test")]
    if config.model.preset == "" or config.corpus.source == "imdb":
        needed.append(("model.hf_path", "the base model's Hugging Face directory"))
    if config.reward.name == "classifier":
        needed.append(("reward.path", "the sentiment classifier's directory"))
    missing = [f"--config.{key} ({what})" for key, what in needed if not _get(config, key)]
    if missing:
        raise ValueError(f"the {config.size!r} configuration needs: {', '.join(missing)}")


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def run(config, workdir: str, results_dir: str = "", stage: str = "all") -> dict:
    """Runs the stages (all, or one whose predecessors are done); returns {stage: seconds}
    of the stages that ran now. A finished stage is skipped (report always runs)."""
    p = Paths(
        os.path.abspath(workdir), os.path.abspath(results_dir or os.path.join(workdir, "results"))
    )
    check_inputs(config)
    os.makedirs(p.workdir, exist_ok=True)
    claim_workdir(config, p)
    wanted = STAGES if stage == "all" else (stage,)
    for before in STAGES[: STAGES.index(wanted[0])]:
        if before != "report" and not is_done(p, before):
            raise ValueError(f"stage {wanted[0]!r} needs stage {before!r} first: --stage={before}")
    timings = {}
    for name in wanted:
        if name != "report" and is_done(p, name):
            log.info("%s: done earlier, skipped", name)
            continue
        start, cpu = time.time(), time.process_time()
        log.info("%s: starting", name)
        STAGE_FUNCTIONS[name](config, p)
        timings[name] = time.time() - start
        if name != "report":
            mark_done(p, name, timings[name], cpu_seconds=round(time.process_time() - cpu, 1))
        log.info("%s: %.0f s", name, timings[name])
    if "report" in wanted:
        write_json(os.path.join(p.results, "timings.json"), stage_seconds(config, p))
    return timings


def stage_seconds(config, p: Paths) -> dict:
    """Wall-clock and CPU seconds (all threads) of each stage and training run, as recorded
    when they finished: on a shared machine the CPU seconds are the steadier measure."""
    names = [s for s in STAGES[:-1]] + ["train_" + m["run"] for m in config.methods]
    return {n: read_json(done_marker(p, n)) for n in names if is_done(p, n)}


def main():
    # Flags are defined here, not at import: the tests import this module next to other
    # entry points that define --config and --workdir too.
    config = config_flags.DEFINE_config_file("config", None, "configs/sentiment.py:ARG")
    workdir = flags.DEFINE_string("workdir", None, "Directory of every stage's outputs.")
    results = flags.DEFINE_string("results_dir", "", "Results directory (<workdir>/results).")
    stage = flags.DEFINE_enum("stage", "all", ("all", *STAGES), "One stage, or all in order.")
    flags.mark_flags_as_required(["config", "workdir"])

    def job(argv):
        del argv
        cli.guarded(lambda: run(config.value, workdir.value, results.value, stage.value))

    app.run(job, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
