"""`validate(config)`: every key of a run checked before any data is read or model built.

Each problem is reported with its dotted config key and the value that was given, all of
them at once (`ConfigError`), so that a misconfigured pod job fails in seconds, not after
tokenizing a dataset. The checks reuse the validators of the pieces they configure
(`make_optimizer`, `TokenizeConfig`, `Objective.create`, `parallel.make_mesh`, ...) rather
than restating them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import ml_collections

from dpo_jax import losses, parallel
from dpo_jax.data.examples import check_on_bad_record
from dpo_jax.data.formats import PREFERENCE_FORMATS
from dpo_jax.data.tokenize import TokenizeConfig
from dpo_jax.evaluation.inputs import REWARDS
from dpo_jax.models import presets
from dpo_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES
from dpo_jax.models.lora import LoraConfig
from dpo_jax.train.optimizers import make_optimizer
from dpo_jax.train.scoring import ScoringOptions
from dpo_jax.train.steps import Guard, Objective
from dpo_jax.train.unpaired import UnpairedObjective

# "rm": a reward model (train/reward.py), "ppo": RLHF (train/ppo.py); neither with "dpo"
STAGES = ("sft", "dpo", "rm", "ppo")
REFERENCE_MODES = ("params", "cached", "none")
INIT_FROM = ("sft", "model")
LAYOUTS = ("padded", "packed", "packed_shared")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """One or more invalid config keys; the message lists each with its dotted name."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def set_hparams(loss_config: ml_collections.ConfigDict) -> dict:
    """The loss hyperparameters a config sets (None entries keep the loss's default)."""
    return {k: v for k, v in loss_config.hparams.items() if v is not None}


def unpaired(config: ml_collections.ConfigDict) -> bool:
    """Whether the DPO stage trains an unpaired loss (`kto`, `apo_zero_unpaired`): it then
    reads unpaired examples (preference pairs split into desirable and undesirable ones)
    and runs the unpaired step (`dpo_jax.train.unpaired`)."""
    return config.dpo.loss.name in losses.unpaired_names()


def objective_of(config: ml_collections.ConfigDict) -> Objective | UnpairedObjective:
    """The DPO stage's objective (loss, beta, hyperparameters) from `config.dpo.loss`."""
    loss = config.dpo.loss
    cls = UnpairedObjective if unpaired(config) else Objective
    return cls.create(loss.name, loss.beta, set_hparams(loss))


def reference_mode(config: ml_collections.ConfigDict) -> str:
    """What the DPO stage holds as its reference: `config.dpo.reference`, except "none" for a
    loss that needs no reference (`requires_reference=False`: ORPO, SimPO, CPO, ...), whatever
    `dpo.reference` says: a frozen copy or cached sums that no step reads would only cost
    memory (a second model) or a scoring pass."""
    if not losses.get(config.dpo.loss.name).requires_reference:
        return "none"
    return config.dpo.reference


def batch_shards(config: ml_collections.ConfigDict) -> int:
    """Ways each process's batch is split over its devices (data x fsdp mesh axes per
    process under "jit", local devices under "pmap")."""
    if config.parallel.mode == "pmap":
        return jax.local_device_count()
    mesh = parallel.make_mesh(tuple(config.parallel.mesh_shape))
    return mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count()


class _Checker:
    def __init__(self, config):
        self.config, self.problems = config, []

    def value(self, key: str):
        node = self.config
        for name in key.split("."):
            node = node[name]
        return node

    def require(self, key: str, ok: Callable[[object], bool], want: str) -> bool:
        value = self.value(key)
        if not ok(value):
            self.problems.append(f"config.{key}={value!r}: {want}")
            return False
        return True

    def call(self, key: str, fn: Callable[[], object]) -> object:
        """Runs a validating constructor; its ValueError becomes a problem of `key`."""
        try:
            return fn()
        except (ValueError, KeyError, TypeError) as err:
            self.problems.append(f"config.{key}: {err}")
            return None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_stage(c: _Checker, name: str) -> None:
    stage = c.config[name]
    c.require(f"{name}.steps", _positive_int, "a stage in config.stages needs steps >= 1")
    c.require(f"{name}.batch_size", _positive_int, "must be an int >= 1")
    if name == "ppo":  # minibatches instead of accumulation; its own batch checks
        _check_ppo_optimizer(c, stage)
        return
    if c.require(f"{name}.accum_steps", _positive_int, "must be an int >= 1"):
        if _positive_int(stage.batch_size) and stage.batch_size % stage.accum_steps:
            c.problems.append(
                f"config.{name}.accum_steps={stage.accum_steps} must divide "
                f"config.{name}.batch_size={stage.batch_size}"
            )
    c.call(
        f"{name}.optimizer",
        lambda: make_optimizer(
            {**stage.optimizer.to_dict(), "total_steps": max(int(stage.steps), 0)}
        ),
    )
    if name != "rm":  # the reward model scores no tokens
        c.call(f"{name}.logps_*", lambda: _scoring_options(stage))
    if _positive_int(stage.batch_size):
        _check_batch_split(c, name, stage.batch_size)


def _scoring_options(stage) -> ScoringOptions:
    options = ScoringOptions.from_config(stage)
    if options.chunk_size < 1 or (options.vocab_chunk_size or 1) < 1:
        raise ValueError("logps_chunk_size must be >= 1 and logps_vocab_chunk_size >= 0")
    return options


def _check_batch_split(c: _Checker, name: str, batch_size: int) -> None:
    processes = jax.process_count()
    if batch_size % processes:
        c.problems.append(
            f"config.{name}.batch_size={batch_size} must divide by the {processes} processes"
        )
        return
    shards = c.call("parallel.mesh_shape", lambda: batch_shards(c.config))
    if shards and (batch_size // processes) % shards:
        c.problems.append(
            f"config.{name}.batch_size={batch_size}: each process's {batch_size // processes} "
            f"examples must divide into its {shards} batch shards (config.parallel.mesh_shape "
            f"or the pmap device count)"
        )


def _check_dpo(c: _Checker) -> None:
    config = c.config
    dpo = config.dpo
    c.require("dpo.init_from", lambda v: v in INIT_FROM, f"expected one of {INIT_FROM}")
    if dpo.init_from == "sft" and "sft" not in config.stages:
        c.problems.append("config.dpo.init_from='sft' needs 'sft' in config.stages (or 'model')")
    c.require("dpo.reference", lambda v: v in REFERENCE_MODES, f"one of {REFERENCE_MODES}")
    c.require("dpo.loss.beta", lambda v: isinstance(v, int | float) and v > 0, "must be > 0")
    loss = c.call("dpo.loss.name", lambda: losses.get(dpo.loss.name))
    if loss is None:
        return
    for key, value in set_hparams(dpo.loss).items():
        if key not in loss.hparams:
            c.problems.append(
                f"config.dpo.loss.hparams.{key}={value!r}: loss {loss.name!r} has no such "
                f"hyperparameter (it accepts {sorted(loss.hparams) or 'none'} besides beta)"
            )
    objective = c.call("dpo.loss", lambda: objective_of(config))
    if objective is None:
        return
    if dpo.lora.rank:
        _check_lora(c)
    if unpaired(config):
        _check_unpaired(c, objective)
        return
    if dpo.reference == "none" and loss.requires_reference:
        c.problems.append(
            f"config.dpo.reference='none': loss {loss.name!r} needs a reference ('params' or "
            "'cached')"
        )
    if dpo.reference == "cached" and objective.ref_per_token:
        c.problems.append(
            f"config.dpo.reference='cached': loss {loss.name!r} needs per-token reference "
            "log-probs; cached per-pair sums are not enough (use 'params')"
        )
    if objective.per_token and config.data.layout != "padded":
        c.problems.append(
            f"config.data.layout={config.data.layout!r}: loss {loss.name!r} needs per-token "
            "log-probs, which only the padded layout gives"
        )
    if objective.sum_sq and dpo.memory_efficient_logps:
        c.problems.append(
            f"config.dpo.memory_efficient_logps=True: loss {loss.name!r} needs the full "
            "next-token distribution (set it to False)"
        )


def lora_of(config: ml_collections.ConfigDict) -> LoraConfig | None:
    """The DPO stage's `LoraConfig`, or None when `config.dpo.lora.rank` is 0 (off)."""
    lora = config.dpo.lora
    if not lora.rank:
        return None
    return LoraConfig(rank=lora.rank, alpha=float(lora.alpha), targets=tuple(lora.targets))


def _check_lora(c: _Checker) -> None:
    config = c.config
    c.call("dpo.lora", lambda: lora_of(config))
    c.require("dpo.lora.base_dtype", lambda v: v in DTYPES, f"expected one of {DTYPES}")
    if config.dpo.reference == "cached":
        # The frozen base is held anyway (the adapters are merged into it), and it is the
        # reference: cached sums would save nothing.
        c.problems.append(
            "config.dpo.reference='cached': LoRA DPO's reference is its frozen base (set "
            "'params', or dpo.lora.rank=0)"
        )


def _check_unpaired(c: _Checker, objective: UnpairedObjective) -> None:
    config, name = c.config, objective.loss.name
    if config.dpo.reference != "params":
        # The KL sequences pair each prompt with another example's completion of the same
        # batch, which the shuffle decides: there is no per-record sum to cache.
        c.problems.append(
            f"config.dpo.reference={config.dpo.reference!r}: loss {name!r} needs the frozen "
            "reference params ('params')"
        )
    if config.data.layout != "padded":
        c.problems.append(
            f"config.data.layout={config.data.layout!r}: loss {name!r} needs 'padded'"
        )
    local = config.dpo.batch_size // max(jax.process_count(), 1)
    if objective.uses_kl and _positive_int(config.dpo.batch_size) and local < 2:
        c.problems.append(
            f"config.dpo.batch_size={config.dpo.batch_size}: loss {name!r} estimates its KL "
            "baseline from mismatched completions of the same batch, so each process needs "
            "at least 2 examples per batch"
        )


def _check_data(c: _Checker) -> None:
    data = c.config.data
    if not data.synthetic:
        if not (data.train_files or data.tfds_name):
            c.problems.append(
                "config.data: no training data; set data.train_files, data.tfds_name or "
                "data.synthetic=True"
            )
        if not (data.tokenizer or c.config.model.hf_path):
            c.problems.append(
                "config.data.tokenizer: set it (or config.model.hf_path) to a "
                "local tokenizer directory"
            )
        elif data.tokenizer:
            c.require("data.tokenizer", os.path.isdir, "no such directory")
    formats = ("auto", *PREFERENCE_FORMATS)
    c.require("data.format", lambda v: v in formats, f"expected one of {formats}")
    c.call(
        "data.tokenize_mode",
        lambda: TokenizeConfig(
            mode=data.tokenize_mode,
            max_length=data.max_length,
            max_prompt_length=data.max_prompt_length,
            truncation_mode=data.truncation_mode,
        ),
    )
    c.require("data.layout", lambda v: v in LAYOUTS, f"expected one of {LAYOUTS}")
    if data.layout != "padded" and c.config.parallel.mode == "pmap":
        # Packed rows number their pairs for the whole batch; splitting them over pmap
        # devices would orphan pairs. Packing shards cleanly under "jit".
        c.problems.append(f"config.data.layout={data.layout!r} needs config.parallel.mode='jit'")
    if data.layout == "packed_shared" and c.config.model.attention == "splash":
        # Splash masks by equal segment ids; a response reading its prompt's segment is not
        # expressible there.
        c.problems.append(
            "config.data.layout='packed_shared' (prompt sharing) cannot run with "
            "config.model.attention='splash'; use 'xla' or 'dot_product'"
        )
    c.call("data.on_bad_record", lambda: check_on_bad_record(data.on_bad_record))
    c.require("data.eval_fraction", lambda v: 0 < v < 1, "must be in (0, 1)")
    c.require("data.pad_to_multiple_of", lambda v: v >= 0, "must be >= 0 (0 = off)")
    c.require("data.num_epochs", lambda v: v >= 0, "must be >= 0 (0 = repeat forever)")


def _check_model(c: _Checker) -> None:
    model = c.config.model
    c.require("model.dtype", lambda v: v in DTYPES, f"expected one of {DTYPES}")
    c.require(
        "model.remat",
        lambda v: isinstance(v, bool) or v in REMAT_POLICIES,
        f"expected one of {REMAT_POLICIES} (or True / False: full / none)",
    )
    c.require("model.scan_layers", lambda v: isinstance(v, bool), "must be True or False")
    c.require(
        "model.attention", lambda v: v in ATTENTION_IMPLS, f"expected one of {ATTENTION_IMPLS}"
    )
    if model.hf_path:
        c.require(
            "model.hf_path",
            lambda v: os.path.isfile(os.path.join(v, "config.json")),
            "not a local Hugging Face model directory (no config.json)",
        )
    elif model.preset != "tiny":
        c.require(
            "model.preset",
            lambda v: v in presets.names(),
            f"set model.hf_path, or a preset: 'tiny' or one of {presets.names()}",
        )


def _check_run(c: _Checker) -> None:
    p = c.config.parallel
    c.require("parallel.mode", lambda v: v in ("jit", "pmap"), "expected 'jit' or 'pmap'")
    c.require(
        "parallel.reference_rules",
        lambda v: v in parallel.REFERENCE_RULES,
        f"expected one of {sorted(parallel.REFERENCE_RULES)}",
    )
    for key in (
        "checkpoint.every_steps",
        "checkpoint.keep",
        "eval.every_steps",
        "log.every_steps",
        "guard.max_consecutive_skipped",
    ):
        c.require(key, _positive_int, "must be an int >= 1")
    c.require("eval.max_batches", lambda v: v >= 0, "must be >= 0 (0 = all)")
    c.call("guard.max_update_ratio", lambda: Guard(c.config.guard.max_update_ratio))
    del p


def _check_generate(c: _Checker) -> None:
    """`eval.generate`: the DPO stage's periodic sampling and scoring."""
    g = c.config.eval.generate
    c.require("eval.generate.every_steps", lambda v: v >= 0, "must be >= 0 (0 = off)")
    if not g.every_steps:
        return
    if "dpo" not in c.config.stages or unpaired(c.config):
        c.problems.append(
            "config.eval.generate.every_steps: generation is evaluated in a "
            "paired DPO stage only (set it to 0)"
        )
    for key in (
        "num_prompts",
        "sampling.max_new_tokens",
        "sampling.num_samples",
        "sampling.batch_size",
        "kl_batch_size",
    ):
        c.require(f"eval.generate.{key}", _positive_int, "must be an int >= 1")
    c.require(
        "eval.generate.sampling.temperatures",
        lambda v: len(v) > 0 and all(t >= 0 for t in v),
        "one or more temperatures >= 0",
    )
    c.require("eval.generate.reward.name", lambda v: v in REWARDS, f"one of {REWARDS}")


def _check_rm(c: _Checker) -> None:
    """The reward-model stage: its start, its loss option, and the data it can read."""
    config = c.config
    if "dpo" in config.stages:
        c.problems.append(
            "config.stages: 'rm' trains a reward model, 'dpo' a policy; run them separately "
            "(e.g. ('sft', 'rm') and ('sft', 'dpo'))"
        )
    c.require("rm.init_from", lambda v: v in INIT_FROM, f"expected one of {INIT_FROM}")
    if config.rm.init_from == "sft" and "sft" not in config.stages:
        c.problems.append("config.rm.init_from='sft' needs 'sft' in config.stages (or 'model')")
    c.require(
        "rm.center_rewards_coefficient",
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0,
        "must be a number >= 0 (0 = off)",
    )
    if config.data.layout != "padded":
        c.problems.append(
            f"config.data.layout={config.data.layout!r}: the reward-model stage reads padded "
            "batches [B, 2, L] only (set config.data.layout='padded')"
        )


PPO_REWARDS = ("learned", "ground_truth")
PPO_GROUND_TRUTHS = ("vader", "classifier", "count")
PPO_VALUE_MODELS = ("separate",)  # "shared" (a head on the policy trunk) is not built


def ppo_updates(ppo: ml_collections.ConfigDict) -> int:
    """Optimizer updates of a PPO stage: iterations x epochs x minibatches."""
    return int(ppo.steps) * int(ppo.epochs) * int(ppo.num_minibatches)


def _check_ppo_optimizer(c: _Checker, ppo) -> None:
    total = (
        ppo_updates(ppo)
        if all(_positive_int(ppo[k]) for k in ("steps", "epochs", "num_minibatches"))
        else 0
    )
    c.call("ppo.optimizer", lambda: make_optimizer({**ppo.optimizer.to_dict(),
                                                    "total_steps": total}))  # fmt: skip


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_ppo(c: _Checker) -> None:
    """The PPO stage: its start, rollouts, reward, value model, KL control and minibatches."""
    from dpo_jax.losses.ppo import KL_KINDS
    from dpo_jax.train.ppo_rollout import SCORE_NORMS

    config = c.config
    ppo = config.ppo
    if "dpo" in config.stages:
        c.problems.append(
            "config.stages: 'ppo' and 'dpo' both train the policy; run them separately"
        )
    if config.parallel.mode != "jit":
        c.problems.append(
            f"config.parallel.mode={config.parallel.mode!r}: the PPO stage runs on a jit mesh "
            "only (set config.parallel.mode='jit')"
        )
    c.require("ppo.init_from", lambda v: v in INIT_FROM, f"expected one of {INIT_FROM}")
    if ppo.init_from == "sft" and "sft" not in config.stages:
        c.problems.append("config.ppo.init_from='sft' needs 'sft' in config.stages (or 'model')")
    for key in ("max_new_tokens", "epochs", "num_minibatches", "kl_horizon"):
        c.require(f"ppo.{key}", _positive_int, "must be an int >= 1")
    if _positive_int(ppo.batch_size) and _positive_int(ppo.num_minibatches):
        if ppo.batch_size % ppo.num_minibatches:
            c.problems.append(
                f"config.ppo.num_minibatches={ppo.num_minibatches} must divide "
                f"config.ppo.batch_size={ppo.batch_size}"
            )
        else:
            _check_minibatch_split(c, ppo.batch_size // ppo.num_minibatches)
    if c.require("ppo.reward", lambda v: v in PPO_REWARDS, f"expected one of {PPO_REWARDS}"):
        if ppo.reward == "learned":
            if "rm" not in config.stages and not os.path.isfile(
                os.path.join(ppo.reward_path, "config.json")
            ):
                c.problems.append(
                    f"config.ppo.reward_path={ppo.reward_path!r}: ppo.reward='learned' needs "
                    "an 'rm' stage in config.stages or a local *ForSequenceClassification "
                    "directory (with config.json) here"
                )
        else:
            _check_ground_truth(c, ppo.ground_truth)
    c.require(
        "ppo.value_model",
        lambda v: v in PPO_VALUE_MODELS,
        f"expected one of {PPO_VALUE_MODELS} (a value head shared with the policy trunk is "
        "not built)",
    )
    c.require("ppo.kl_coef", lambda v: _number(v) and v >= 0, "must be a number >= 0")
    c.require("ppo.kl_estimator", lambda v: v in KL_KINDS, f"expected one of {KL_KINDS}")
    c.require(
        "ppo.kl_target",
        lambda v: v is None or (_number(v) and v > 0),
        "must be > 0 (nats per sequence), or None for a fixed kl_coef",
    )
    for key in ("gamma", "lam"):
        c.require(f"ppo.{key}", lambda v: _number(v) and 0 <= v <= 1, "must be in [0, 1]")
    for key in ("clip_range", "clip_range_value"):
        c.require(f"ppo.{key}", lambda v: _number(v) and v > 0, "must be > 0")
    c.require("ppo.vf_coef", lambda v: _number(v) and v >= 0, "must be a number >= 0")
    c.require("ppo.whiten_rewards", lambda v: isinstance(v, bool), "must be True or False")
    c.require("ppo.score_norm", lambda v: v in SCORE_NORMS, f"expected one of {SCORE_NORMS}")


def _check_minibatch_split(c: _Checker, minibatch: int) -> None:
    """Each process's share of a PPO minibatch (and so of the rollout batch) must split
    evenly over its batch shards."""
    processes = jax.process_count()
    shards = c.call("parallel.mesh_shape", lambda: batch_shards(c.config))
    if minibatch % processes or (shards and (minibatch // processes) % shards):
        c.problems.append(
            f"config.ppo.batch_size={c.config.ppo.batch_size}: its minibatches of {minibatch} "
            f"rollouts (config.ppo.num_minibatches={c.config.ppo.num_minibatches}) must divide "
            f"by the {processes} process(es) and then by each process's {shards} batch shards "
            "(config.parallel.mesh_shape)"
        )


def _check_ground_truth(c: _Checker, gt) -> None:
    names = PPO_GROUND_TRUTHS
    if not c.require("ppo.ground_truth.name", lambda v: v in names, f"expected one of {names}"):
        return
    if gt.name == "count" and not gt.target:
        c.problems.append(
            "config.ppo.ground_truth.target='': the count reward needs the substring to count"
        )
    if gt.name == "classifier":
        c.require(
            "ppo.ground_truth.path",
            lambda v: os.path.isfile(os.path.join(v, "config.json")),
            "not a local Hugging Face classifier directory (no config.json)",
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` listing every invalid key of `config` (a run config)."""
    c = _Checker(config)
    stages = tuple(config.stages)
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        c.problems.append(f"config.stages={stages!r}: a non-empty subset of {STAGES}, in order")
    elif list(stages) != sorted(stages, key=STAGES.index):
        c.problems.append(f"config.stages={stages!r}: SFT runs before DPO; write {STAGES}")
    _check_run(c)
    _check_generate(c)
    _check_model(c)
    _check_data(c)
    for name in stages:
        if name in STAGES:
            _check_stage(c, name)
    if "dpo" in stages:
        _check_dpo(c)
    if "rm" in stages:
        _check_rm(c)
    if "ppo" in stages:
        _check_ppo(c)
    if c.problems:
        raise ConfigError(c.problems)
