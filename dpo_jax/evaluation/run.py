"""The evaluation job: sample from each policy, score, estimate KL, write tables.

Read top to bottom: inputs (`dpo_jax.evaluation.inputs`: policies, reference, tokenizer,
prompts, reward) -> per policy x temperature: sample, score, KL to the reference, win rate
against the dataset's chosen response -> outputs.

Outputs under <workdir>/eval/: samples_<checkpoint>.jsonl (every sample with its reward and
log-probs), metrics.csv (one row per checkpoint x temperature, rewritten after each row),
judge_<checkpoint>_T<temperature>_vs_{chosen,baseline}.jsonl when an LLM-judge template is
set, and the metrics table printed at the end.

Win rates (reward judge, Wilson 95% intervals) follow the DPO paper's two comparisons: each
sample against its prompt's dataset response (chosen), and, with `baseline_samples`, against
another system's sample of the same prompt (row by row, from a samples_<x>.jsonl of an
earlier evaluation at the same temperatures).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import sampling
from dpo_jax.data.tokenize import load_tokenizer, pad_id_of
from dpo_jax.evaluation import inputs, judges, kl, rewards

log = logging.getLogger(__name__)

COLUMNS = (
    "checkpoint",
    "temperature",
    "samples",
    "reward_mean",
    "reward_stderr",
    "kl_mean",
    "kl_stderr",
    "implicit_reward_mean",
    "length_mean",
    "length_max",
    "stopped_fraction",
    "win_rate_vs_chosen",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "win_rate_vs_baseline",
    "win_rate_vs_baseline_ci_low",
    "win_rate_vs_baseline_ci_high",
)


# ------------------------------------------------------------------------------------------
# One policy at one temperature
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every policy is evaluated against (loaded once)."""

    config: ml_collections.ConfigDict
    tokenizer: Any
    prompts: inputs.Prompts
    reference: tuple[Any, Any]  # (model, params)
    reward: rewards.Reward | None
    chosen_rewards: np.ndarray | None  # [P] reward of each prompt's dataset (chosen) response
    beta: float  # of the implicit reward
    baseline: dict | None  # {temperature: [R] another system's completions}, or None
    baseline_rewards: dict | None  # {temperature: [R] their rewards}


def _sample(setup: Setup, model, params, temperature, key):
    """All prompts' samples in chunks of `sampling.batch_size` prompts: completions (token
    id lists, EOS included when a row stopped) and [R] lengths, logps, model_logps."""
    s, prompt_ids = setup.config.sampling, setup.prompts.ids
    completions, lengths, logps, model_logps = [], [], [], []
    for chunk, start in enumerate(range(0, len(prompt_ids), s.batch_size)):
        batch = prompt_ids[start : start + s.batch_size]
        used = len(batch) * s.num_samples
        if len(prompt_ids) > s.batch_size:
            # A short last chunk is filled up with copies of its first prompt (their rows
            # are dropped below): one batch shape, one compiled sampler.
            batch = batch + [batch[0]] * (s.batch_size - len(batch))
        out = sampling.sample(
            model,
            params,
            batch,
            rng=jax.random.fold_in(key, chunk),
            max_new_tokens=s.max_new_tokens,
            temperature=temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=setup.tokenizer.eos_token_id,
            num_samples=s.num_samples,
            pad_id=pad_id_of(setup.tokenizer),
        )
        completions += [out.tokens[r, : out.lengths[r]].tolist() for r in range(used)]
        lengths.append(out.lengths[:used])
        logps.append(out.logps[:used].sum(-1))
        model_logps.append(out.model_logps[:used].sum(-1))
    arrays = (np.concatenate(x).astype(np.float64) for x in (lengths, logps, model_logps))
    return completions, *arrays


def _stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def evaluate_one(setup: Setup, label: str, model, params, temperature: float, key):
    """Samples, scores and KL of one policy at one temperature.

    Returns (metrics row, per-sample records, {opponent: (prompts, completions, opponent's
    completions)} with opponent "chosen" and, when configured, "baseline").
    """
    tokenizer, prompts = setup.tokenizer, setup.prompts
    completions, lengths, logps, model_logps = _sample(setup, model, params, temperature, key)
    n = setup.config.sampling.num_samples
    index = np.repeat(np.arange(len(prompts.ids)), n)  # rows are prompt-major
    prompt_texts = [prompts.texts[i] for i in index]
    chosen = [prompts.chosen[i] for i in index]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    row = {
        "checkpoint": label,
        "temperature": temperature,
        "samples": len(completions),
        "length_mean": float(lengths.mean()),
        "length_max": int(lengths.max()),
    }
    ref_logps = None
    if setup.reference is not None:  # None: a training run without reference params
        ref_model, ref_params = setup.reference
        ref_logps = kl.completion_logps(
            ref_model,
            ref_params,
            [prompts.ids[i] for i in index],
            completions,
            batch_size=setup.config.kl_batch_size,
            pad_id=pad_id_of(tokenizer),
        )
        # The samples come from the sampling distribution (temperature, top-k/p), so its
        # log-probs give KL(sampling distribution || reference); = KL(pi || ref) at T=1.
        divergence = kl.sequence_kl(logps, ref_logps)
        implicit = rewards.implicit_reward(model_logps, ref_logps, setup.beta)
        row.update(
            kl_mean=divergence.mean,
            kl_stderr=divergence.stderr,
            implicit_reward_mean=float(implicit.mean()),
        )
    stopped = np.array([c[-1] == tokenizer.eos_token_id for c in completions])
    row["stopped_fraction"] = float(stopped.mean())
    scores = None
    if setup.reward is not None:
        scores = np.asarray(setup.reward(prompt_texts, texts), np.float64)
        row.update(reward_mean=float(scores.mean()), reward_stderr=_stderr(scores))
        outcomes = judges.compare_rewards(scores, setup.chosen_rewards[index])
        outcomes = judges.tie_identical(outcomes, texts, chosen)
        rate, low, high = judges.win_rate(outcomes)
        row.update(win_rate_vs_chosen=rate, win_rate_ci_low=low, win_rate_ci_high=high)
        if setup.baseline_rewards is not None:
            outcomes = judges.compare_rewards(scores, setup.baseline_rewards[temperature])
            outcomes = judges.tie_identical(outcomes, texts, setup.baseline[temperature])
            rate, low, high = judges.win_rate(outcomes)
            row.update(win_rate_vs_baseline=rate, win_rate_vs_baseline_ci_low=low,
                       win_rate_vs_baseline_ci_high=high)  # fmt: skip
    samples = [
        {
            "checkpoint": label,
            "temperature": temperature,
            "prompt_index": int(index[i]),
            "sample_index": i % n,
            "prompt": prompt_texts[i],
            "completion": texts[i],
            "length": int(lengths[i]),
            "stopped": bool(stopped[i]),
            "reward": None if scores is None else float(scores[i]),
            "logp": float(logps[i]),
            "model_logp": float(model_logps[i]),
            "ref_logp": None if ref_logps is None else float(ref_logps[i]),
        }
        for i in range(len(completions))
    ]
    pairs = {"chosen": (prompt_texts, texts, chosen)}
    if setup.baseline is not None:
        pairs["baseline"] = (prompt_texts, texts, setup.baseline[temperature])
    return row, samples, pairs


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------


def write_csv(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # a reader never sees a half-written table


def format_table(rows: list[dict]) -> str:
    """The metrics as an aligned text table (mean +- stderr, rate [95% CI])."""

    def pm(row, name, digits):
        if row.get(f"{name}_mean") is None:
            return "-"
        return f"{row[f'{name}_mean']:.{digits}f} +- {row[f'{name}_stderr']:.{digits}f}"

    def win(row, name, ci):
        if row.get(name) is None:
            return "-"
        return f"{row[name]:.3f} [{row[ci + '_low']:.3f}, {row[ci + '_high']:.3f}]"

    header = ["checkpoint", "T", "n", "reward", "KL", "length", "win vs chosen [95% CI]"]
    with_baseline = any(r.get("win_rate_vs_baseline") is not None for r in rows)
    if with_baseline:
        header.append("win vs baseline [95% CI]")
    lines = []
    for r in rows:
        line = [r["checkpoint"], f"{r['temperature']:g}", str(r["samples"]), pm(r, "reward", 4),
                pm(r, "kl", 3), f"{r['length_mean']:.1f}",
                win(r, "win_rate_vs_chosen", "win_rate_ci")]  # fmt: skip
        if with_baseline:
            line.append(win(r, "win_rate_vs_baseline", "win_rate_vs_baseline_ci"))
        lines.append(line)
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
        for x in [header, *lines]
    )


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Setup, list]:
    """Loads what every policy is evaluated against; returns it and the policies."""
    tokenizer = load_tokenizer(inputs.tokenizer_dir(config, workdir))
    vocab_size = len(tokenizer)
    policies = inputs.resolve_policies(config, workdir, vocab_size)
    reference = inputs.load_reference(config, workdir, vocab_size)
    prompts = inputs.load_prompts(config, tokenizer, inputs.prompt_files(config, workdir))
    reward = inputs.build_reward(config)
    # The dataset's responses are scored once, not once per checkpoint and temperature.
    chosen_rewards = None if reward is None else np.asarray(reward(prompts.texts, prompts.chosen))
    beta = config.implicit_beta
    if beta < 0:
        beta = 0.1 if config.policy_hf_path else float(inputs.train_config(workdir).dpo.loss.beta)
    baseline = baseline_rewards = None
    if config.baseline_samples:
        n = config.sampling.num_samples
        baseline = inputs.load_baseline(
            config.baseline_samples, prompts, n, config.sampling.temperatures
        )
        if reward is not None:
            row_prompts = [t for t in prompts.texts for _ in range(n)]
            baseline_rewards = {t: np.asarray(reward(row_prompts, c)) for t, c in baseline.items()}
    common = Setup(config, tokenizer, prompts, reference, reward, chosen_rewards, beta, baseline,
                   baseline_rewards)  # fmt: skip
    return common, policies


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Evaluates every policy of `config` at every temperature; returns the metrics rows."""
    temperatures = [float(t) for t in config.sampling.temperatures]
    if not temperatures:
        raise ValueError("config.sampling.temperatures is empty")
    common, policies = setup(config, workdir)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    log.info(
        "Evaluating %d policies x %d temperatures on %d prompts.",
        len(policies),
        len(temperatures),
        len(common.prompts.ids),
    )
    from tqdm import tqdm

    total = len(policies) * len(temperatures)
    bar = tqdm(total=total, desc="evaluate", disable=not config.progress_bar, dynamic_ncols=True)
    rows = []
    base_key = jax.random.key(config.seed)
    ref_vocab = common.reference[0].config.vocab_size
    for policy in policies:
        model, params = policy.load()
        if model.config.vocab_size != ref_vocab:
            raise ValueError(
                f"policy {policy.label!r} has vocab_size {model.config.vocab_size} but the "
                f"reference has {ref_vocab}: they must share a tokenizer"
            )
        with open(os.path.join(out_dir, f"samples_{policy.label}.jsonl"), "w") as f:
            for t_index, temperature in enumerate(temperatures):
                # The same key per temperature for every checkpoint: checkpoints are compared
                # on common random numbers, which lowers the variance of their differences.
                key = jax.random.fold_in(base_key, t_index)
                row, samples, pairs = evaluate_one(
                    common, policy.label, model, params, temperature, key
                )
                f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in samples)
                for opponent, texts in pairs.items() if config.judge_template else ():
                    name = f"judge_{policy.label}_T{temperature:g}_vs_{opponent}.jsonl"
                    judges.write_judge_requests(
                        os.path.join(out_dir, name),
                        *texts,
                        template=config.judge_template,
                        seed=config.seed,
                    )
                rows.append(row)
                write_csv(os.path.join(out_dir, "metrics.csv"), rows)
                bar.update(1)
        del params  # one policy's params in memory at a time
    bar.close()
    print(format_table(rows), flush=True)
    return rows
