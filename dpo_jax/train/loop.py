"""The main job: SFT and/or DPO stages over a device mesh, checkpointed, resumable.

Read top to bottom: process setup -> config validation -> data -> model -> devices ->
stages (each: optimizer, state, restore, steps, evaluation, checkpoints) -> export ->
summary. `dpo_jax/train/README.md` maps each part of a DPO update to its module.

Resume order of a stage: its own latest readable checkpoint in the workdir, else its
starting params (the previous stage's final params, a Hugging Face directory, or a seeded
random init). A finished stage is restored from its final checkpoint, not rerun, so
rerunning a killed command continues exactly where the checkpoint left it: the train
state (params, optimizer state, step, rng) and every process's data-iterator position
come back, and the remaining steps see the same batches and keys as an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dpo_jax import models, parallel
from dpo_jax.data import batching
from dpo_jax.models import lora as lora_lib
from dpo_jax.models import reward as reward_model
from dpo_jax.train import devices as devices_lib
from dpo_jax.train import inputs, ppo, reference_cache, reward, steps, throughput, unpaired
from dpo_jax.train import workdir as workdir_lib
from dpo_jax.train.checkpoints import StageCheckpointer
from dpo_jax.train.devices import Devices
from dpo_jax.train.generation import GenerationEval
from dpo_jax.train.metrics import MetricWriter, ProgressBar, to_python
from dpo_jax.train.optimizers import make_optimizer
from dpo_jax.train.scoring import ScoringOptions, pair_logps
from dpo_jax.train.validate import STAGES, lora_of, objective_of, reference_mode, validate
from dpo_jax.train.workdir import params_fingerprint

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """The run stopped itself (e.g. too many consecutive skipped steps); its last
    checkpoint holds the last accepted params."""


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
    """(model, host params or None). None: params are a seeded random init (see `Devices`).

    Refuses a model whose vocabulary is smaller than the tokenizer's (on every path):
    token ids past the embedding table would make every step NaN.
    """
    m = config.model
    overrides = {
        **m.overrides.to_dict(),
        "dtype": m.dtype,
        "remat": m.remat,
        "scan_layers": m.scan_layers,
        "attention": m.attention,
    }
    if m.hf_path:
        dtype = overrides.pop("dtype")
        model, params = models.from_hf(m.hf_path, dtype=dtype, **overrides)
        where = f"config.model.hf_path={m.hf_path!r}"
    else:
        if m.preset == "tiny":
            model_config = models.ModelConfig.tiny(**{"vocab_size": vocab_size, **overrides})
        else:
            model_config = models.presets.get(m.preset, **overrides)
        model, params = models.DecoderLM(model_config), None
        where = f"config.model.preset={m.preset!r}"
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"{where}: the model's vocabulary ({model.config.vocab_size} tokens) is smaller "
            f"than the tokenizer's ({vocab_size}); use the tokenizer the model was trained "
            "with (config.data.tokenizer)"
        )
    return model, params


# ------------------------------------------------------------------------------------------
# One stage
# ------------------------------------------------------------------------------------------


class Stage:
    """Everything one stage needs; `run()` trains it to its last step and returns params."""

    def __init__(self, name, config, workdir, devices, splits, writer, init_params, reference):
        self.name, self.config, self.devices = name, config, devices
        self.splits, self.writer, self.workdir = splits, writer, workdir
        self.stage_config = config[name]
        self.total = int(self.stage_config.steps)
        self.init_params, self.reference = init_params, reference
        # The reward model scores no tokens: it has no log-prob options.
        self.scoring = None if name == "rm" else ScoringOptions.from_config(self.stage_config)
        self.checkpointer = StageCheckpointer(
            os.path.join(os.path.abspath(workdir), "checkpoints", name),
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
        )
        self.local_batch = self.stage_config.batch_size // jax.process_count()
        self.seed = config.seed + 1000 * (STAGES.index(name) + 1)
        self.eval_ref_logps = None  # cached mode: reference sums of the held-out pairs
        # LoRA DPO: the state holds the adapters, `reference` is the frozen base they merge into.
        self.lora = lora_of(config) if name == "dpo" else None
        self.skipped = {"nonfinite": 0, "rejected": 0}  # steps the guard refused, in total

    # --- build ------------------------------------------------------------------------

    def _step_and_eval(self, tx):
        c, model = self.stage_config, self.devices.model
        axis = parallel.PMAP_AXIS if self.devices.mode == "pmap" else None
        common = dict(
            model=model,
            tx=tx,
            scoring=self.scoring,
            accum_steps=c.accum_steps,
            axis_name=axis,
            guard=steps.Guard(self.config.guard.max_update_ratio),
        )
        if self.name == "sft":
            return steps.make_sft_step(**common), None
        if self.name == "rm":
            objective = reward.RewardObjective(float(c.center_rewards_coefficient))
            del common["scoring"]
            evaluate = reward.make_rm_eval_step(model=model, objective=objective, axis_name=axis)
            return reward.make_rm_step(objective=objective, **common), evaluate
        objective = objective_of(self.config)
        if self.splits.unpaired:
            make_step, make_eval = unpaired.make_unpaired_step, unpaired.make_unpaired_eval_step
        else:
            make_step, make_eval = steps.make_dpo_step, steps.make_eval_step
        evaluate = make_eval(
            model=model, objective=objective, scoring=self.scoring, axis_name=axis, lora=self.lora
        )
        return make_step(objective=objective, lora=self.lora, **common), evaluate

    def _cached_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference log-prob sums [N, 2] of every (train, held-out) pair, from the stage's
        starting params: read from the stage's checkpoint directory when an earlier attempt
        wrote them from the same params, pairs and scoring options (a content key), else
        computed once, in record order, and written there (process 0).

        Held-out pairs are cached too (not scored by a frozen reference at each evaluation),
        so no copy of the reference params outlives this call.
        """
        directory = os.fspath(self.checkpointer.directory)
        paths = [os.path.join(directory, f) for f in ("ref_logps.npy", "eval_ref_logps.npy")]
        splits = (self.splits.pairs, self.splits.eval_pairs)
        fingerprint = params_fingerprint(self.init_params)
        keys = [
            reference_cache.cache_key(fingerprint, pairs, self.scoring, self.config.data.max_length)
            for pairs in splits
        ]
        cached = [
            reference_cache.load_ref_logps(path, len(pairs), key)
            for path, pairs, key in zip(paths, splits, keys, strict=True)
        ]
        found = all(ref is not None for ref in cached)
        if jax.process_count() > 1:  # process 0's view decides, so all take the same branch
            found = bool(multihost_utils.broadcast_one_to_all(np.array(found)))
        if found:
            log.info("%s: reusing the cached reference log-probs in %s.", self.name, directory)
            return tuple(cached)
        score_fn = functools.partial(pair_logps, model=self.devices.model, options=self.scoring)
        score = self.devices.compile_scoring(score_fn, self.init_params)
        cached = [
            reference_cache.score_pairs(
                score,
                pairs,
                self.config,
                tokenizer=self.splits.tokenizer,
                batch_size=self.local_batch,
            )
            for pairs in splits
        ]
        if jax.process_index() == 0:
            for path, ref, key in reversed(list(zip(paths, cached, keys, strict=True))):
                reference_cache.save_ref_logps(
                    path, ref, key
                )  # train last: both exist once it does
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cached reference log-probs written")
        log.info(
            "%s: cached the reference log-probs of %d + %d pairs in %s.",
            self.name,
            len(cached[0]),
            len(cached[1]),
            directory,
        )
        return tuple(cached)

    def _start(self, tx):
        """(state, train iterator): restored from the latest checkpoint, or fresh."""
        rng = jax.random.fold_in(jax.random.key(self.config.seed), STAGES.index(self.name))
        ref_logps = None
        if self.name == "dpo" and reference_mode(self.config) == "cached":
            ref_logps, self.eval_ref_logps = self._cached_reference()
        if self.lora is None:
            state = self.devices.new_state(self.init_params, tx, rng)
        else:
            state = self._adapter_state(tx, rng)
        # The state holds its own copy; dropping ours frees the starting params (which in
        # cached mode were the reference) once the caller has dropped its references too.
        self.init_params = None
        train_iter = inputs.train_iterator(
            self.splits,
            self.config,
            self.name,
            batch_size=self.local_batch,
            seed=self.seed,
            ref_logps=ref_logps,
        )
        restored = self.checkpointer.restore_latest(self.devices.checkpoint_target(state))
        if restored is not None:
            step, host_state, data_states = restored
            state = self.devices.from_checkpoint(host_state)
            train_iter.set_state(data_states["iterators"][jax.process_index()])
            self.skipped["nonfinite"] = data_states["nonfinite_steps"]
            self.skipped["rejected"] = data_states.get("rejected_steps", 0)
            self.writer.drop_after(self.name, step)
            log.info("%s: resumed from step %d of %d.", self.name, step, self.total)
        return state, train_iter

    def _adapter_state(self, tx, rng):
        """LoRA: a step-0 state around fresh adapters (B = 0), sharded like their kernels."""
        abstract = self.devices.abstract_params
        init = functools.partial(lora_lib.init_adapters, abstract, self.lora)
        adapters = jax.jit(init)(jax.random.key(self.seed))
        specs = lora_lib.adapter_specs(self.devices.param_specs, abstract, self.lora)
        return self.devices.new_state(adapters, tx, rng, param_specs=specs)

    def _final_params(self, state):
        """The trained policy, one copy: LoRA adapters merged into the base (for the next
        stage and for export)."""
        params = self.devices.params_of(state)
        if self.lora is None:
            return params
        base = self.devices.to_checkpoint(self.reference)  # pmap: one copy of the replicas
        return self._merge(base, params)

    @functools.cached_property
    def _merge(self):
        # Built once: a new jit wrapper per call would recompile at every generation eval.
        return jax.jit(functools.partial(lora_lib.merge, config=self.lora))

    # --- the loop ----------------------------------------------------------------------

    def run(self):
        tx = make_optimizer({**self.stage_config.optimizer.to_dict(), "total_steps": self.total})
        state, train_iter = self._start(tx)
        step = int(jax.device_get(self.devices.to_checkpoint(state).step))
        step_fn, eval_fn = self._step_and_eval(tx)
        train = self.devices.compile(step_fn, self.reference)
        evaluate = eval_fn and self.devices.compile_eval(eval_fn, self.reference)
        generate = self._generation_eval()
        if step == 0:
            self._log_eval(evaluate, generate, state, 0)
        every = {
            "log": self.config.log.every_steps,
            "eval": self.config.eval.every_steps,
            "generate": self.config.eval.generate.every_steps or self.total,
            "checkpoint": self.config.checkpoint.every_steps,
        }
        bar = ProgressBar(self.name, self.total, step, self.config.log.progress_bar)
        window, guard_limit = _Window(step), self.config.guard.max_consecutive_skipped
        meter = self._meter()
        try:
            while step < self.total:
                local = next(train_iter)
                meter.add(local)
                state, metrics = train(state, local)
                step += 1
                window.add(metrics)
                last = step == self.total
                # Read at least every `max_consecutive_skipped` steps, to stop a dead run soon.
                if step % every["log"] == 0 or last or window.unread >= guard_limit:
                    self._log_train(step, window, bar, local, meter)
                due_eval, due_generate, due_save = (
                    step % every[k] == 0 or last for k in ("eval", "generate", "checkpoint")
                )
                if due_eval or due_generate or due_save:
                    with meter.paused(state):  # evaluation and saving are not training time
                        self._log_eval(
                            evaluate if due_eval else None,
                            generate if due_generate else None,
                            state,
                            step,
                        )
                        if due_save:
                            self._save(step, state, train_iter)
        except TrainingAborted:
            self.checkpointer.close()  # pending saves (of accepted params) reach the disk
            raise
        finally:
            bar.close()
            train_iter.close()
        self.checkpointer.close()
        return self._final_params(state)

    def _meter(self) -> throughput.Meter:
        """Tokens/s, pairs/s, TFLOP/s per device and MFU of this stage's steps."""
        stage = "unpaired" if self.name == "dpo" and self.splits.unpaired else self.name
        stage = "dpo" if stage == "rm" else stage  # pairs, one forward per sequence
        reference = self.name == "dpo" and reference_mode(self.config) == "params"
        return throughput.Meter(self.devices.model.config, stage=stage, reference_forward=reference)

    def _log_train(self, step: int, window: _Window, bar: ProgressBar, local, meter) -> None:
        """Writes the latest step's metrics and the guard's counts since the last write;
        aborts the run after too many consecutive skipped steps."""
        m = to_python(window.last)
        nonfinite, rejected, consecutive = window.flush()
        self.skipped["nonfinite"] += nonfinite
        self.skipped["rejected"] += rejected
        if nonfinite or rejected:
            log.warning(
                "%s: step(s) skipped up to step %d, params kept: %d non-finite, %d "
                "over the update bound (guard.max_update_ratio).",
                self.name,
                step,
                nonfinite,
                rejected,
            )
        m["nonfinite_steps_total"] = self.skipped["nonfinite"]
        m["rejected_steps_total"] = self.skipped["rejected"]
        m["tokens_per_sec"] = bar.update(step - window.start, m, window.tokens)
        m["padding_fraction"] = batching.padding_fraction(local)
        m.update(meter.read())  # window.flush() above synced on the steps it measures
        window.start, window.tokens = step, 0.0
        self.writer.write(self.name, step, m)
        # A background save that failed stops the run now, not at the next save.
        self.checkpointer.check()
        limit = self.config.guard.max_consecutive_skipped
        if consecutive >= limit:
            raise TrainingAborted(
                f"{self.name}: the last {consecutive} steps (up to step {step}) were all "
                f"skipped ({self.skipped['nonfinite']} non-finite, {self.skipped['rejected']} "
                f"over the update bound in total; limit config.guard.max_consecutive_skipped="
                f"{limit}). The model is not learning: check the learning rate, the data and "
                f"the model/tokenizer pairing. The last checkpoint in "
                f"{self.checkpointer.directory} holds the last accepted params."
            )

    def _save(self, step: int, state, train_iter) -> None:
        data_state = {
            "iterators": devices_lib.all_process_states(train_iter.get_state()),
            "nonfinite_steps": self.skipped["nonfinite"],
            "rejected_steps": self.skipped["rejected"],
        }
        self.checkpointer.save(step, self.devices.to_checkpoint(state), data_state)

    # --- evaluation ---------------------------------------------------------------------

    def _log_eval(self, evaluate, generate, state, step):
        """Held-out metrics (`evaluate`) and the policy's generations (`generate`), each when
        given."""
        if evaluate:
            self._log_held_out(evaluate, state, step)
        if generate:
            self.writer.write(self.name, step, generate(self._final_params(state), step))

    def _generation_eval(self) -> GenerationEval | None:
        """The DPO stage's periodic generation-based evaluation (`config.eval.generate`)."""
        if self.name != "dpo" or not self.config.eval.generate.every_steps:
            return None
        # One copy of the reference (pmap holds replicas); LoRA: the frozen base.
        reference = None if self.reference is None else self.devices.to_checkpoint(self.reference)
        beta = float(self.config.dpo.loss.beta)
        model = self.devices.model
        return GenerationEval(self.config, self.splits, model, reference, beta, self.workdir)

    def _log_held_out(self, evaluate, state, step):
        """Held-out metrics: each batch's means weighted by what they are means over (real
        pairs; for unpaired losses the desirable or undesirable examples), counts summed."""
        if self.splits.unpaired:
            counts, weights, per = unpaired.COUNT_KEYS, unpaired.MEAN_WEIGHTS, "examples"
        else:
            counts, weights, per = ("pairs", "tokens"), {}, "pairs"
        totals: dict[str, float] = {}
        summed = dict.fromkeys(counts, 0.0)
        max_items = self.config.eval.max_batches * self.local_batch
        batches = inputs.eval_iterator(
            self.splits, self.config, batch_size=self.local_batch, ref_logps=self.eval_ref_logps
        )
        for local in batches:
            m = to_python(evaluate(state.params, local))
            n = {k: m.pop(k) for k in counts}
            for k, v in m.items():
                w = n[weights.get(k, per)]
                totals[k] = totals.get(k, 0.0) + v * w
                totals["weight:" + k] = totals.get("weight:" + k, 0.0) + w
            summed = {k: summed[k] + n[k] for k in counts}
            if max_items and summed[per] >= max_items:
                break
        metrics = {
            f"eval/{k}": v / max(totals["weight:" + k], 1.0)
            for k, v in totals.items()
            if not k.startswith("weight:")
        }
        if self.splits.unpaired:  # a difference of means, not a mean of differences
            metrics["eval/rewards/margins"] = (
                metrics["eval/rewards/chosen"] - metrics["eval/rewards/rejected"]
            )
        metrics.update({f"eval/{k}": v for k, v in summed.items()})
        self.writer.write(self.name, step, metrics)
        return metrics


class _Window:
    """Device-side sums of the steps since the last metrics write (no host sync per step),
    and the count of consecutive skipped steps, carried across windows."""

    def __init__(self, start: int):
        self.start, self.tokens, self.last, self.unread = start, 0.0, None, 0
        self._sums = jnp.zeros((3,), jnp.float32)  # non-finite, rejected, tokens
        self._run = jnp.zeros((), jnp.float32)

    def add(self, metrics) -> None:
        nonfinite, rejected = metrics["nonfinite_steps"], metrics["rejected_steps"]
        self._sums = self._sums + jnp.stack([nonfinite, rejected, metrics["tokens"]])
        self._run = jnp.where(nonfinite + rejected > 0, self._run + 1, 0.0)
        self.last, self.unread = metrics, self.unread + 1

    def flush(self) -> tuple[int, int, int]:
        """(non-finite, rejected, consecutive skipped steps) read from the devices; the sums
        restart."""
        sums, run = jax.device_get((self._sums, self._run))
        self.tokens += float(sums[2])
        self._sums, self.unread = jnp.zeros((3,), jnp.float32), 0
        return int(sums[0]), int(sums[1]), int(run)


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def _export(model, params, tokenizer, workdir):
    """Writes the final policy (or reward model: a `*ForSequenceClassification`) as a
    Hugging Face directory `<workdir>/hf` (process 0)."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        path = os.path.join(workdir, "hf")
        if isinstance(model, reward_model.RewardModel):
            # transformers' classifiers take each row's last token that is not pad_token_id:
            # the id the tokenizer pads with (a tokenizer without one pads with EOS when
            # `HFClassifierReward` loads it).
            pad_id = tokenizer.pad_token_id
            pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
            models.hf.to_hf_classifier(model, jax.device_get(params), path, pad_token_id=pad_id)
        else:
            models.to_hf(model, jax.device_get(params), path)
        tokenizer.save_pretrained(path)
        log.info("Exported the final policy to %s", path)


SUMMARY_ROWS = (
    ("reward accuracy", "rewards/accuracies"),
    ("log-prob accuracy", "logps/accuracies"),
    ("reward margin", "rewards/margins"),
    ("chosen reward", "rewards/chosen"),
    ("rejected reward", "rewards/rejected"),
    ("chosen log-prob", "logps/chosen"),
    ("rejected log-prob", "logps/rejected"),
    ("KL baseline (KTO)", "kl"),
    ("DPO loss", "loss"),
)


def summarize(workdir: str) -> str:
    """What DPO changed on the held-out pairs, and what the data lost, read back from
    `<workdir>/metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    lines = []
    data = [r for r in records if r["stage"] == "data"]
    if data:
        counts = {
            k.split("/", 2)[2]: int(v)
            for k, v in data[-1].items()
            if k.startswith("data/") and k.count("/") == 2 and v
        }
        if counts:
            lines.append("Data: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    lines.extend(_throughput_lines(records))
    lines.extend(_ppo_lines(records))
    evals = [r for r in records if r["stage"] == "dpo" and "eval/loss" in r]
    if not evals:
        if any(r["stage"] == "ppo" for r in records):
            return "\n".join(lines)
        return "\n".join([*lines, "no DPO evaluation recorded"])
    first, last = evals[0], evals[-1]
    what = "pairs" if "eval/pairs" in last else "examples"
    lines.append(
        f"Held-out {what} ({int(last['eval/' + what])}): step {first['step']} -> {last['step']}"
    )
    for label, key in SUMMARY_ROWS:
        if "eval/" + key in last:  # unpaired losses have no accuracies, paired ones no kl
            label = "unpaired loss" if key == "loss" and what == "examples" else label
            line = f"  {label:<18} {first['eval/' + key]:>10.4f} -> {last['eval/' + key]:>10.4f}"
            lines.append(line)
    if what == "pairs":
        lines.append(
            "  (chance is 0.5; at step 0 the policy is the reference: rewards tie, accuracy 0)"
        )
    else:
        lines.append("  (at step 0 the policy is the reference: every reward is 0)")
    return "\n".join(lines)


def _ppo_lines(records) -> list[str]:
    """PPO: the rollouts' mean score and sequence KL, first iteration -> last."""
    logged = [r for r in records if r["stage"] == "ppo" and "score" in r]
    if not logged:
        return []
    first, last = logged[0], logged[-1]
    return [
        f"PPO rollouts: iteration {first['step']} -> {last['step']}: mean score "
        f"{first['score']:.4f} -> {last['score']:.4f}, KL {first['kl']:.4f} -> "
        f"{last['kl']:.4f} nats per sequence, kl_coef {last['kl_coef']:.4g}"
    ]


def _throughput_lines(records) -> list[str]:
    """Per stage: medians of the logged throughput windows (the first one, which includes
    compilation, left out when there are others)."""
    lines = []
    for stage in STAGES:
        logged = [r for r in records if r["stage"] == stage and "mfu" in r]
        if not logged:
            continue
        which = f"median of {len(logged) - 1} log windows after the first"
        if len(logged) == 1:
            which = "one log window, compilation included"
        logged = logged[1:] if len(logged) > 1 else logged
        rate = next(k for k in throughput.ITEM_RATES.values() if k in logged[-1])
        keys = (rate, "tokens_per_s", "tflops_per_device", "mfu", "peak_tflops_per_device")
        med = {k: float(np.median([r[k] for r in logged])) for k in keys}
        lines.append(
            f"Throughput {stage} ({which}): "
            f"{med[rate]:,.1f} {rate.removesuffix('_per_s')}/s, {med['tokens_per_s']:,.0f} "
            f"tokens/s, {med['tflops_per_device']:.4g} TFLOP/s per device, MFU "
            f"{100 * med['mfu']:.1f}% of {med['peak_tflops_per_device']:.4g} TFLOP/s"
        )
    return lines


def _data_record(splits) -> dict[str, float]:
    """The data's bad-record and tokenization counts as one metrics.jsonl record."""
    what = "examples" if getattr(splits, "unpaired", False) else "pairs"
    record = {f"data/train_{what}": len(splits.pairs), f"data/eval_{what}": len(splits.eval_pairs)}
    for group, counts in (
        ("skipped", getattr(splits, "bad_records", {})),
        ("tokenize", getattr(splits, "tokenize_events", {})),
    ):
        record[f"data/{group}_total"] = sum(counts.values())
        record.update({f"data/{group}/{k}": v for k, v in counts.items()})
    return record


def _stage_inputs(name, config, devices, params, initial_params):
    """(starting params, frozen reference or None) of stage `name`."""
    if name != "dpo":
        return params, None
    if config.dpo.init_from == "model":
        params = initial_params
    mode, lora = reference_mode(config), lora_of(config)
    if lora is not None:  # the frozen base of the adapters, and (adapters off) the reference
        if config.dpo.lora.base_dtype == "bfloat16":
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        return params, devices.reference(params)
    if mode != config.dpo.reference:
        log.info(
            "dpo: loss %r needs no reference; config.dpo.reference=%r is ignored (one model "
            "in memory, no cached sums).",
            config.dpo.loss.name,
            config.dpo.reference,
        )
    reference = devices.reference(params) if mode == "params" else None
    return params, reference


def _reward_inputs(config, lm, params, initial_params):
    """(devices of the reward model, its starting params) of the `rm` stage: the language
    model's (this run's SFT stage, or `config.model`) without `lm_head`, plus a fresh
    `score` head drawn from the stage's seed (as transformers initialises it)."""
    start = initial_params if config.rm.init_from == "model" else params
    rm = reward_model.RewardModel(reward_model.trunk_config(lm.config))
    rm_devices = Devices(config, rm, jnp.zeros((1, 1), jnp.int32))
    key = jax.random.key(config.seed + 1000 * (STAGES.index("rm") + 1))
    score_shape = rm_devices.abstract_params["score"].shape
    score = lm.config.initializer_range * jax.random.normal(key, score_shape, jnp.float32)
    host = reward_model.from_lm_params(start, score)
    return rm_devices, rm_devices.initial_params(host, config.seed)


def run(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> Any:
    """Runs (or resumes) every stage of `config` in `workdir`; returns the final params."""
    # --- process setup and config ---
    p = config.parallel
    parallel.initialize_distributed(
        p.coordinator_address or None,
        p.num_processes or None,
        None if p.process_id < 0 else p.process_id,
        auto_detect=p.auto_detect,
    )
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    # The workdir holds one run: a rerun with other settings is refused (workdir.py).
    workdir_lib.claim(workdir, config, allow_config_change=allow_config_change)
    writer = MetricWriter(workdir, wandb_project=config.log.wandb_project, config=config.to_dict())

    # --- data ---
    if jax.process_index() == 0 and config.data.synthetic:
        inputs.generate_synthetic(config.data, config.seed, os.path.join(workdir, "data"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data written")
    splits = inputs.load_splits(config, workdir)
    writer.drop_after("data", -1)  # a rerun replaces the record instead of adding one
    writer.write("data", 0, _data_record(splits))

    # --- model and devices ---
    model, host_params = build_model(config, len(splits.tokenizer))
    devices = Devices(config, model, jnp.zeros((1, 1), jnp.int32))
    initial_params = params = devices.initial_params(host_params, config.seed)

    # --- stages ---
    lm_devices, policy_start, trained_rm = devices, None, None
    for name in config.stages:
        if name == "ppo":  # the policy again (after a reward model, if any), its own loop
            if config.ppo.init_from == "model":
                policy_start = initial_params if policy_start is None else policy_start
            elif policy_start is None:
                policy_start = params  # this run's SFT, no reward model in between
            stage = ppo.PPOStage(config, workdir, lm_devices, splits, writer, policy_start,
                                 reward=trained_rm)  # fmt: skip
            params = policy_start = trained_rm = initial_params = None
            params, model = stage.run(), lm_devices.model
            continue
        if name == "rm":  # a reward model: its own module (score head) and placement
            if "ppo" in config.stages:  # PPO's policy starts from the LM, not the RM
                policy_start = initial_params if config.ppo.init_from == "model" else params
            devices, params = _reward_inputs(config, model, params, initial_params)
            model, reference, initial_params = devices.model, None, None
        else:
            params, reference = _stage_inputs(name, config, devices, params, initial_params)
        stage = Stage(name, config, workdir, devices, splits, writer, params, reference)
        # The stage owns its starting params now; holding no reference to them here lets it
        # free them (cached reference mode).
        params = reference = None
        if name == "dpo":
            initial_params = None
        params = stage.run()
        if name == "rm" and "ppo" in config.stages:
            trained_rm = (model, params)

    # --- export and summary ---
    if config.export_hf:
        _export(model, params, splits.tokenizer, workdir)
    writer.close()
    if jax.process_index() == 0 and ("dpo" in config.stages or "ppo" in config.stages):
        print(summarize(workdir), flush=True)
    return params
