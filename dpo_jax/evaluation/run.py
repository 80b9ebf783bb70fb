"""The evaluation job: sample from a policy, score, estimate KL, write tables.

Read top to bottom: what to evaluate (policies, reference, tokenizer, prompts) -> the
reward -> per policy x temperature: sample, score, KL, win rate -> outputs.

The policy is a Hugging Face directory (`config.policy_hf_path`) or, when that is empty,
the training workdir given on the command line, evaluated at
  checkpoints="final"   its final export <workdir>/hf,
  checkpoints="latest"  its newest DPO checkpoint <workdir>/checkpoints/dpo/<step>,
  checkpoints="all"     every saved DPO checkpoint (params only are restored, with orbax).
The reference is `config.reference_hf_path`, else the workdir's own: the final SFT
checkpoint when its DPO stage started from SFT, else its starting model (`model.hf_path`,
or the seeded random init the run began from).

Outputs under <workdir>/eval/: samples_<checkpoint>.jsonl (every sample with its reward and
log-probs), metrics.csv (one row per checkpoint x temperature, rewritten after each row),
and the same table printed at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import models, parallel, sampling
from dpo_jax.data import sources
from dpo_jax.data.tokenize import TokenizeConfig, load_tokenizer, pad_id_of, tokenize_sequence
from dpo_jax.evaluation import judges, kl, rewards

log = logging.getLogger(__name__)

CHECKPOINTS = ("final", "latest", "all")
REWARDS = ("vader", "classifier", "none")
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
)


# ------------------------------------------------------------------------------------------
# What to evaluate
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Policy:
    """One policy to evaluate: `label` names its outputs; `load()` -> (model, params)."""

    label: str
    load: Callable[[], tuple[Any, Any]]


def _train_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir} is not a training workdir (no config.json); set config.policy_hf_path "
            "to evaluate a Hugging Face directory instead"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(directory: str) -> list[int]:
    """The saved steps of a stage's checkpoint directory (orbax writes each to <step>/ when
    complete; unfinished saves are named <step>.orbax-checkpoint-tmp-*)."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))
    )


def restore_params(step_dir: str) -> Any:
    """The `params` of the TrainState saved in `<step_dir>/state`, as host numpy arrays.

    A partial restore: the optimizer state (twice the params for Adam) is never read.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    path = epath.Path(step_dir).absolute() / "state"
    if not path.is_dir():
        raise FileNotFoundError(f"{step_dir}: no 'state' item (not a dpo_jax checkpoint step)")
    # The item's handler, not a Checkpointer: the step-level metadata file lives one
    # directory up, and a Checkpointer on the item directory warns that it is missing.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(path).tree
        if "params" not in tree:
            raise ValueError(f"{path}: the saved state has no 'params' (keys: {sorted(tree)})")
        target = {
            "params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])
        }
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = handler.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
    finally:
        handler.close()
    return restored["params"]


def _train_model(train_config, vocab_size: int):
    """The training run's (model, host params or None), as the run built them."""
    from dpo_jax.train.loop import build_model

    return build_model(train_config, vocab_size)


def _starting_params(train_config, model, host_params):
    """The params the run started from: from_hf's, or its seeded random init (the same
    computation as `dpo_jax.train.devices.Devices.initial_params`, on one device)."""
    if host_params is not None:
        return host_params
    init = model.init(jax.random.key(train_config.seed), jnp.zeros((1, 1), jnp.int32))
    return jax.device_get(parallel.unbox(init["params"]))


def resolve_policies(config, workdir: str, vocab_size: int) -> list[Policy]:
    if config.policy_hf_path:
        path = config.policy_hf_path
        return [Policy("hf", lambda: models.from_hf(path, dtype=config.dtype))]
    if config.checkpoints not in CHECKPOINTS:
        raise ValueError(f"config.checkpoints={config.checkpoints!r}; expected {CHECKPOINTS}")
    if config.checkpoints == "final":
        path = os.path.join(workdir, "hf")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path}: no final Hugging Face export (the run has not finished, or ran with "
                "export_hf=False); set config.checkpoints='latest' or 'all'"
            )
        return [Policy("final", lambda: models.from_hf(path, dtype=config.dtype))]
    directory = os.path.join(workdir, "checkpoints", "dpo")
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(
            f"{directory}: no checkpoint (no <step>/state directories); has the DPO stage of "
            f"this run saved one yet?"
        )
    if config.checkpoints == "latest":
        steps = steps[-1:]
    train_config = _train_config(workdir)
    model = _train_model(train_config, vocab_size)[0]

    def loader(step):
        return lambda: (model, restore_params(os.path.join(directory, str(step))))

    return [Policy(str(step), loader(step)) for step in steps]


def load_reference(config, workdir: str, vocab_size: int):
    """(model, params) of the reference policy (see the module docstring)."""
    if config.reference_hf_path:
        return models.from_hf(config.reference_hf_path, dtype=config.dtype)
    if config.policy_hf_path:
        raise ValueError(
            "config.reference_hf_path is empty: a Hugging Face policy needs an explicit "
            "reference (e.g. the SFT model it was trained from) for the KL estimate"
        )
    train_config = _train_config(workdir)
    model, host_params = _train_model(train_config, vocab_size)
    if "sft" in train_config.stages and train_config.dpo.init_from == "sft":
        directory = os.path.join(workdir, "checkpoints", "sft")
        steps = checkpoint_steps(directory)
        if not steps:
            raise FileNotFoundError(
                f"{directory}: no SFT checkpoint, the reference of this run's DPO stage"
            )
        return model, restore_params(os.path.join(directory, str(steps[-1])))
    return model, _starting_params(train_config, model, host_params)


def _tokenizer_dir(config, workdir: str) -> str:
    if config.tokenizer:
        return config.tokenizer
    if config.policy_hf_path:
        return config.policy_hf_path
    export = os.path.join(workdir, "hf")
    if os.path.isfile(os.path.join(export, "tokenizer_config.json")):
        return export
    data = _train_config(workdir).data
    if data.synthetic:
        return os.path.join(workdir, "data", "tokenizer")
    return data.tokenizer or _train_config(workdir).model.hf_path


def _prompt_files(config, workdir: str) -> list[str]:
    if config.prompts.files:
        return list(config.prompts.files)
    if not config.policy_hf_path:
        data = _train_config(workdir).data
        if data.synthetic:
            return [os.path.join(workdir, "data", "eval.jsonl")]
        if data.eval_files:
            return list(data.eval_files)
    raise ValueError(
        "set config.prompts.files (JSON/JSONL/parquet records in a dpo_jax.data format: "
        "preference records or {prompt, completion})"
    )


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Held-out prompts: token ids (what the policy is sampled on), texts (decoded from
    those ids, what rewards see) and the dataset's reference (chosen) completion texts."""

    ids: list[list[int]]
    texts: list[str]
    chosen: list[str]


def load_prompts(config, tokenizer, files: list[str]) -> Prompts:
    """The first `prompts.max_prompts` usable records of `files`, tokenized as in training.

    Preference records give their prompt and chosen response, {prompt, completion} records
    their prompt and completion (the comparison for `win_rate_vs_chosen`).
    """
    p = config.prompts
    tokenize_config = TokenizeConfig(
        mode=p.tokenize_mode,
        max_length=p.max_prompt_length + config.sampling.max_new_tokens,
        max_prompt_length=p.max_prompt_length,
        truncation_mode=p.truncation_mode,
    )
    records = sources.iter_records(files)
    examples = sources.parse_records(
        records, kind="sft", record_format=p.format, tokenizer=tokenizer
    )
    ids, texts, chosen = [], [], []
    for example, _ in examples:
        tokenized = tokenize_sequence(example, tokenizer, tokenize_config)
        ids.append(tokenized.prompt_ids)
        texts.append(tokenizer.decode(tokenized.prompt_ids, skip_special_tokens=True))
        chosen.append(example.completion)
        if len(ids) == p.max_prompts:
            break
    if not ids:
        raise ValueError(f"no usable prompts in {files}")
    return Prompts(ids, texts, chosen)


def build_reward(config) -> rewards.Reward | None:
    r = config.reward
    if r.name == "vader":
        return rewards.VaderSentiment(with_prompt=r.with_prompt)
    if r.name == "classifier":
        label = r.label if r.label != "" else None
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        return rewards.HFClassifierReward(
            r.path,
            label=label,
            score=r.score,
            with_prompt=r.with_prompt,
            batch_size=r.batch_size,
            device=r.device,
        )
    if r.name == "none":
        return None
    raise ValueError(f"config.reward.name={r.name!r}; expected one of {REWARDS}")


# ------------------------------------------------------------------------------------------
# One policy at one temperature
# ------------------------------------------------------------------------------------------


def _sample(config, model, params, prompts: Prompts, temperature, key, eos_id, pad_id):
    """Samples in chunks of `sampling.batch_size` prompts; returns per-row arrays/lists."""
    s = config.sampling
    completions, lengths, logps, model_logps = [], [], [], []
    for chunk, start in enumerate(range(0, len(prompts.ids), s.batch_size)):
        out = sampling.sample(
            model,
            params,
            prompts.ids[start : start + s.batch_size],
            rng=jax.random.fold_in(key, chunk),
            max_new_tokens=s.max_new_tokens,
            temperature=temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_id=eos_id,
            num_samples=s.num_samples,
            pad_id=pad_id,
        )
        for row in range(out.tokens.shape[0]):
            n = int(out.lengths[row])
            completions.append(out.tokens[row, :n].tolist())
        lengths.append(out.lengths)
        logps.append(out.logps.sum(-1))
        model_logps.append(out.model_logps.sum(-1))
    return completions, *(
        np.concatenate(x).astype(np.float64) for x in (lengths, logps, model_logps)
    )


def _stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def evaluate_one(
    config, label, model, params, reference, prompts, tokenizer, reward, temperature, key, beta
):
    """Samples, scores and KL of one policy at one temperature: (metrics row, samples)."""
    eos_id = tokenizer.eos_token_id
    completions, lengths, logps, model_logps = _sample(
        config, model, params, prompts, temperature, key, eos_id, pad_id_of(tokenizer)
    )
    n = config.sampling.num_samples
    prompt_ids = [ids for ids in prompts.ids for _ in range(n)]  # rows are prompt-major
    prompt_texts = [t for t in prompts.texts for _ in range(n)]
    chosen = [c for c in prompts.chosen for _ in range(n)]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    ref_model, ref_params = reference
    ref_logps = kl.completion_logps(
        ref_model,
        ref_params,
        prompt_ids,
        completions,
        batch_size=config.kl_batch_size,
        pad_id=pad_id_of(tokenizer),
    )
    # The samples come from the sampling distribution (temperature, top-k/p), so its
    # log-probs give KL(sampling distribution || reference); = KL(pi || ref) at T=1.
    divergence = kl.sequence_kl(logps, ref_logps)
    stopped = np.array([bool(c) and c[-1] == eos_id for c in completions])
    row = {
        "checkpoint": label,
        "temperature": temperature,
        "samples": len(completions),
        "kl_mean": divergence.mean,
        "kl_stderr": divergence.stderr,
        "implicit_reward_mean": float(rewards.implicit_reward(model_logps, ref_logps, beta).mean()),
        "length_mean": float(lengths.mean()),
        "length_max": int(lengths.max()),
        "stopped_fraction": float(stopped.mean()),
    }
    scores = None
    if reward is not None:
        scores = np.asarray(reward(prompt_texts, texts), np.float64)
        row.update(reward_mean=float(scores.mean()), reward_stderr=_stderr(scores))
        outcomes = judges.RewardJudge(reward)(prompt_texts, texts, chosen)
        rate, low, high = judges.win_rate(outcomes)
        row.update(win_rate_vs_chosen=rate, win_rate_ci_low=low, win_rate_ci_high=high)
    samples = [
        {
            "checkpoint": label,
            "temperature": temperature,
            "prompt_index": i // n,
            "sample_index": i % n,
            "prompt": prompt_texts[i],
            "completion": texts[i],
            "length": int(lengths[i]),
            "stopped": bool(stopped[i]),
            "reward": None if scores is None else float(scores[i]),
            "logp": float(logps[i]),
            "model_logp": float(model_logps[i]),
            "ref_logp": float(ref_logps[i]),
        }
        for i in range(len(completions))
    ]
    return row, samples, (prompt_texts, texts, chosen)


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
    """The metrics as an aligned text table (mean +- stderr where there is one)."""

    def pm(row, name, digits):
        if row.get(f"{name}_mean") is None:
            return "-"
        return f"{row[f'{name}_mean']:.{digits}f} +- {row[f'{name}_stderr']:.{digits}f}"

    header = ("checkpoint", "T", "n", "reward", "KL", "length", "win vs chosen [95% CI]")
    lines = []
    for r in rows:
        win = "-"
        if r.get("win_rate_vs_chosen") is not None:
            win = (
                f"{r['win_rate_vs_chosen']:.3f} [{r['win_rate_ci_low']:.3f}, "
                f"{r['win_rate_ci_high']:.3f}]"
            )
        lines.append(
            (
                r["checkpoint"],
                f"{r['temperature']:g}",
                str(r["samples"]),
                pm(r, "reward", 4),
                pm(r, "kl", 3),
                f"{r['length_mean']:.1f}",
                win,
            )
        )
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
        for x in [header, *lines]
    )


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Evaluates every policy of `config` at every temperature; returns the metrics rows."""
    temperatures = [float(t) for t in config.sampling.temperatures]
    if not temperatures:
        raise ValueError("config.sampling.temperatures is empty")
    tokenizer = load_tokenizer(_tokenizer_dir(config, workdir))
    vocab_size = len(tokenizer)
    policies = resolve_policies(config, workdir, vocab_size)
    reference = load_reference(config, workdir, vocab_size)
    prompts = load_prompts(config, tokenizer, _prompt_files(config, workdir))
    reward = build_reward(config)
    beta = config.implicit_beta
    if beta < 0:
        beta = float(_train_config(workdir).dpo.loss.beta) if not config.policy_hf_path else 0.1
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    log.info(
        "Evaluating %d policies x %d temperatures on %d prompts.",
        len(policies),
        len(temperatures),
        len(prompts.ids),
    )

    from tqdm import tqdm

    bar = tqdm(
        total=len(policies) * len(temperatures),
        desc="evaluate",
        disable=not config.progress_bar,
        dynamic_ncols=True,
    )
    rows = []
    base_key = jax.random.key(config.seed)
    for policy in policies:
        model, params = policy.load()
        if model.config.vocab_size != reference[0].config.vocab_size:
            raise ValueError(
                f"policy {policy.label!r} has vocab_size {model.config.vocab_size} but the "
                f"reference has {reference[0].config.vocab_size}: they must share a tokenizer"
            )
        samples_path = os.path.join(out_dir, f"samples_{policy.label}.jsonl")
        with open(samples_path, "w", encoding="utf-8") as f:
            for t_index, temperature in enumerate(temperatures):
                # The same key per temperature for every checkpoint: checkpoints are compared
                # on common random numbers, which lowers the variance of their differences.
                key = jax.random.fold_in(base_key, t_index)
                row, samples, triples = evaluate_one(
                    config,
                    policy.label,
                    model,
                    params,
                    reference,
                    prompts,
                    tokenizer,
                    reward,
                    temperature,
                    key,
                    beta,
                )
                for sample in samples:
                    f.write(json.dumps(sample, ensure_ascii=False) + "\n")
                if config.judge_template:
                    judges.write_judge_requests(
                        os.path.join(out_dir, f"judge_{policy.label}_T{temperature:g}.jsonl"),
                        *triples,
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
