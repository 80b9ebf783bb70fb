"""What an evaluation evaluates: policies, reference, tokenizer, prompts and reward.

The policy is a Hugging Face directory (`config.policy_hf_path`) or, when that is empty,
the training workdir given on the command line, evaluated at
  checkpoints="final"   its final export <workdir>/hf,
  checkpoints="latest"  its newest policy checkpoint <workdir>/checkpoints/<stage>/<step>,
  checkpoints="all"     every saved policy checkpoint (params only are restored, with orbax),
where <stage> is the run's policy stage: ppo when it has one (its states hold the policy
and the value model; the policy's params are read), else dpo. The reference is
`config.reference_hf_path`, else the workdir's own: the final SFT checkpoint when that
stage started from SFT, else its starting model (`model.hf_path`, or the seeded random
init the run began from). The tokenizer and the held-out prompts default to the run's too
(its export or data tokenizer; its held-out files).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import models, parallel
from dpo_jax.data import sources
from dpo_jax.data.examples import RecordError
from dpo_jax.data.tokenize import TokenizeConfig, tokenize_sequence
from dpo_jax.evaluation import rewards

CHECKPOINTS = ("final", "latest", "all")
REWARDS = ("vader", "classifier", "none")


@dataclasses.dataclass(frozen=True)
class Policy:
    """One policy to evaluate: `label` names its outputs; `load()` -> (model, params)."""

    label: str
    load: Callable[[], tuple[Any, Any]]


def train_config(workdir: str) -> ml_collections.ConfigDict:
    """The training run's resolved config, read back from <workdir>/config.json."""
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


def _train_model(train, vocab_size: int):
    """The training run's (model, host params or None), as the run built them."""
    from dpo_jax.train.loop import build_model

    return build_model(train, vocab_size)


def _starting_params(train, model, host_params):
    """The params the run started from: from_hf's, or its seeded random init (the same
    computation as `dpo_jax.train.devices.Devices.initial_params`, on one device)."""
    if host_params is not None:
        return host_params
    init = model.init(jax.random.key(train.seed), jnp.zeros((1, 1), jnp.int32))
    return jax.device_get(parallel.unbox(init["params"]))


def policy_stage(train) -> str:
    """The stage whose checkpoints are a run's policy: "ppo" when it has one, else "dpo"."""
    return "ppo" if "ppo" in train.stages else "dpo"


def restore_policy_params(step_dir: str, stage: str) -> Any:
    """A policy checkpoint's params: a PPO state's are {"policy", "value"}."""
    params = restore_params(step_dir)
    return params["policy"] if stage == "ppo" else params


def resolve_policies(config, workdir: str, vocab_size: int) -> list[Policy]:
    """The policies to evaluate, in order (see the module docstring); loaded lazily."""
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
    train = train_config(workdir)
    stage = policy_stage(train)
    directory = os.path.join(workdir, "checkpoints", stage)
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(
            f"{directory}: no checkpoint (no <step>/state directories); has the "
            f"{stage.upper()} stage of this run saved one yet?"
        )
    if config.checkpoints == "latest":
        steps = steps[-1:]
    model = _train_model(train, vocab_size)[0]

    def loader(step):
        return lambda: (model, restore_policy_params(os.path.join(directory, str(step)), stage))

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
    train = train_config(workdir)
    model, host_params = _train_model(train, vocab_size)
    stage = policy_stage(train)
    if "sft" in train.stages and train[stage].init_from == "sft":
        directory = os.path.join(workdir, "checkpoints", "sft")
        steps = checkpoint_steps(directory)
        if not steps:
            raise FileNotFoundError(
                f"{directory}: no SFT checkpoint, the reference of this run's {stage.upper()} stage"
            )
        return model, restore_params(os.path.join(directory, str(steps[-1])))
    return model, _starting_params(train, model, host_params)


def tokenizer_dir(config, workdir: str) -> str:
    """config.tokenizer, else the policy's HF directory, else the run's (its export, its
    generated toy tokenizer, or its data.tokenizer / model.hf_path)."""
    if config.tokenizer:
        return config.tokenizer
    if config.policy_hf_path:
        return config.policy_hf_path
    export = os.path.join(workdir, "hf")
    if os.path.isfile(os.path.join(export, "tokenizer_config.json")):
        return export
    data = train_config(workdir).data
    if data.synthetic:
        return os.path.join(workdir, "data", "tokenizer")
    return data.tokenizer or train_config(workdir).model.hf_path


def prompt_files(config, workdir: str) -> list[str]:
    """config.prompts.files, else the run's held-out files (generated or data.eval_files)."""
    if config.prompts.files:
        return list(config.prompts.files)
    if not config.policy_hf_path:
        data = train_config(workdir).data
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
    """The first `prompts.max_prompts` records of `files` (0: all), tokenized as in training.

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
    for example, location in examples:
        try:
            tokenized = tokenize_sequence(example, tokenizer, tokenize_config)
        except RecordError as err:
            raise err.at(location) from None  # names the file and line
        ids.append(tokenized.prompt_ids)
        texts.append(tokenizer.decode(tokenized.prompt_ids, skip_special_tokens=True))
        chosen.append(example.completion)
        if len(ids) == p.max_prompts:  # 0: never, i.e. every record
            break
    if not ids:
        raise ValueError(f"no usable prompts in {files}")
    return Prompts(ids, texts, chosen)


def load_baseline(path: str, prompts: Prompts, num_samples: int, temperatures) -> dict:
    """Another system's completions of the same prompts, from a samples_<x>.jsonl file this
    job wrote: {temperature: [R] completion texts in our row order (prompt-major)}.

    Every evaluated temperature needs the rows (prompt_index < P, sample_index < n) with
    the same prompt texts; anything else raises a ValueError naming the file.
    """
    wanted = {float(t) for t in temperatures}
    found: dict[float, dict[tuple[int, int], str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            s = json.loads(line)
            t = float(s["temperature"])
            if t not in wanted:
                continue
            i, j = int(s["prompt_index"]), int(s["sample_index"])
            if i < len(prompts.texts) and s["prompt"] != prompts.texts[i]:
                raise ValueError(
                    f"{path}:{line_no}: prompt {i} is {s['prompt'][:60]!r}, but this "
                    f"evaluation's prompt {i} is {prompts.texts[i][:60]!r}: not the same prompts"
                )
            found.setdefault(t, {})[(i, j)] = s["completion"]
    out = {}
    for t in sorted(wanted):
        rows = [(i, j) for i in range(len(prompts.texts)) for j in range(num_samples)]
        missing = [r for r in rows if r not in found.get(t, {})]
        if missing:
            raise ValueError(
                f"{path}: no baseline sample (prompt_index, sample_index) = {missing[0]} at "
                f"temperature {t:g} ({len(missing)} of {len(rows)} rows missing)"
            )
        out[t] = [found[t][r] for r in rows]
    return out


def build_reward(config) -> rewards.Reward | None:
    """The configured reward (config.reward), or None for reward.name='none'."""
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
