"""The main job: SFT and/or DPO stages over a device mesh, checkpointed, resumable.

Read top to bottom: process setup -> data -> model -> devices -> stages (each: optimizer,
state, restore, steps, evaluation, checkpoints) -> export -> summary.

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

from dpo_jax import losses, models, parallel
from dpo_jax.data import batching
from dpo_jax.train import devices as devices_lib
from dpo_jax.train import inputs, reference_cache, steps
from dpo_jax.train.checkpoints import StageCheckpointer
from dpo_jax.train.devices import Devices
from dpo_jax.train.metrics import MetricWriter, ProgressBar, to_python
from dpo_jax.train.optimizers import make_optimizer

log = logging.getLogger(__name__)

STAGES = ("sft", "dpo")


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
    """(model, host params or None). None: params are a seeded random init (see `Devices`)."""
    m = config.model
    overrides = {**m.overrides.to_dict(), "dtype": m.dtype, "remat": m.remat}
    if m.hf_path:
        dtype = overrides.pop("dtype")
        return models.from_hf(m.hf_path, dtype=dtype, **overrides)
    if m.preset == "tiny":
        model_config = models.ModelConfig.tiny(**{"vocab_size": vocab_size, **overrides})
    elif m.preset:
        model_config = models.presets.get(m.preset, **overrides)
    else:
        raise ValueError("set config.model.hf_path (a local HF directory) or config.model.preset")
    if model_config.vocab_size < vocab_size:
        raise ValueError(
            f"model vocab_size {model_config.vocab_size} < the tokenizer's {vocab_size} tokens"
        )
    return models.DecoderLM(model_config), None


# ------------------------------------------------------------------------------------------
# One stage
# ------------------------------------------------------------------------------------------


class Stage:
    """Everything one stage needs; `run()` trains it to its last step and returns params."""

    def __init__(self, name, config, workdir, devices, splits, writer, init_params, reference):
        self.name, self.config, self.devices = name, config, devices
        self.splits, self.writer = splits, writer
        self.stage_config = config[name]
        self.total = int(self.stage_config.steps)
        self.init_params, self.reference = init_params, reference
        self.checkpointer = StageCheckpointer(
            os.path.join(os.path.abspath(workdir), "checkpoints", name),
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
        )
        if devices.mode == "pmap" and config.data.layout == "packed":
            # Packed rows number their pairs for the whole batch; splitting them over pmap
            # devices would orphan pairs. Packing shards cleanly under "jit".
            raise ValueError("data.layout='packed' needs parallel.mode='jit' (not 'pmap')")
        batch_size = self.stage_config.batch_size
        if batch_size % jax.process_count():
            raise ValueError(f"{name}.batch_size={batch_size} must divide by the process count")
        self.local_batch = batch_size // jax.process_count()
        if self.local_batch % devices.shards:
            raise ValueError(
                f"{name}.batch_size={batch_size}: each process's {self.local_batch} examples "
                f"must divide into its {devices.shards} batch shards"
            )
        self.seed = config.seed + 1000 * (STAGES.index(name) + 1)
        self.eval_ref_logps = None  # cached mode: reference sums of the held-out pairs

    # --- build ------------------------------------------------------------------------

    def _step_and_eval(self, tx):
        c, model = self.stage_config, self.devices.model
        axis = parallel.PMAP_AXIS if self.devices.mode == "pmap" else None
        if self.name == "sft":
            return steps.make_sft_step(model=model, tx=tx, grad_reduce_axis=axis), None
        loss = dict(loss_name=c.loss.name, beta=c.loss.beta, loss_hparams=c.loss.hparams.to_dict(),
                    memory_efficient=c.memory_efficient_logps)  # fmt: skip
        step = steps.make_dpo_step(model=model, tx=tx, accum_steps=c.accum_steps,
                                   grad_reduce_axis=axis, **loss)  # fmt: skip
        return step, steps.make_eval_step(model=model, reduce_axis=axis, **loss)

    def _cached_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference log-prob sums [N, 2] of every (train, held-out) pair, from the stage's
        starting params: read from the stage's checkpoint directory when a previous attempt
        wrote them, else computed once, in record order, and written there (process 0).

        Held-out pairs are cached too (not scored by a frozen reference at each evaluation),
        so no copy of the reference params outlives this call.
        """
        directory = os.fspath(self.checkpointer.directory)
        paths = [os.path.join(directory, f) for f in ("ref_logps.npy", "eval_ref_logps.npy")]
        splits = (self.splits.pairs, self.splits.eval_pairs)
        found = all(os.path.exists(path) for path in paths)
        if jax.process_count() > 1:  # process 0's view decides, so all take the same branch
            found = bool(multihost_utils.broadcast_one_to_all(np.array(found)))
        if found:
            log.info("%s: reusing the cached reference log-probs in %s.", self.name, directory)
            return tuple(reference_cache.load_ref_logps(path, len(pairs))
                         for path, pairs in zip(paths, splits, strict=True))  # fmt: skip
        c = self.stage_config
        score_fn = functools.partial(steps.reference_logps, model=self.devices.model,
                                     memory_efficient=c.memory_efficient_logps)  # fmt: skip
        score = self.devices.compile_scoring(score_fn, self.init_params)
        pad_id = reference_cache.pad_id_of(self.splits.tokenizer)
        cached = []
        for pairs in splits:
            ref = np.zeros((len(pairs), 2), np.float32)
            for local, indices in reference_cache.scoring_batches(pairs, self.config, pad_id=pad_id,
                                                         batch_size=self.local_batch):  # fmt: skip
                out, indices = score(local, indices)
                ref[indices[indices >= 0]] = out[indices >= 0]
            cached.append(ref)
        if jax.process_index() == 0:
            for path, ref in reversed(list(zip(paths, cached, strict=True))):
                reference_cache.save_ref_logps(path, ref)  # train last: both exist once it does
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cached reference log-probs written")
        log.info("%s: cached the reference log-probs of %d + %d pairs in %s.", self.name,
                 len(cached[0]), len(cached[1]), directory)  # fmt: skip
        return tuple(cached)

    def run(self):
        c = self.stage_config
        tx = make_optimizer({**c.optimizer.to_dict(), "total_steps": self.total})
        rng = jax.random.fold_in(jax.random.key(self.config.seed), STAGES.index(self.name))
        ref_logps = None
        if self.name == "dpo" and self.config.dpo.reference == "cached":
            if losses.get(c.loss.name).requires_reference:
                ref_logps, self.eval_ref_logps = self._cached_reference()
        state = self.devices.new_state(self.init_params, tx, rng)
        # The state holds its own copy; dropping ours frees the starting params (which in
        # cached mode were the reference) once the caller has dropped its references too.
        self.init_params = None
        train_iter = inputs.train_iterator(self.splits, self.config, self.name,
                                           batch_size=self.local_batch, seed=self.seed,
                                           ref_logps=ref_logps)  # fmt: skip
        nonfinite_total = 0

        restored = self.checkpointer.restore_latest(self.devices.checkpoint_target(state))
        if restored is not None:
            step, host_state, data_states = restored
            state = self.devices.from_checkpoint(host_state)
            train_iter.set_state(data_states["iterators"][jax.process_index()])
            nonfinite_total = data_states["nonfinite_steps"]
            self.writer.drop_after(self.name, step)
            log.info("%s: resumed from step %d of %d.", self.name, step, self.total)
        step = int(jax.device_get(self.devices.to_checkpoint(state).step))

        step_fn, eval_fn = self._step_and_eval(tx)
        train = self.devices.compile(step_fn, self.reference)
        evaluate = eval_fn and self.devices.compile_eval(eval_fn, self.reference)
        if evaluate and step == 0:
            self._log_eval(evaluate, state, 0)

        log_every, eval_every = self.config.log.every_steps, self.config.eval.every_steps
        ckpt_every = self.config.checkpoint.every_steps
        bar = ProgressBar(self.name, self.total, step, self.config.log.progress_bar)
        nonfinite = jnp.zeros((), jnp.float32)
        tokens = jnp.zeros((), jnp.float32)
        last_logged = step
        while step < self.total:
            local = next(train_iter)
            state, metrics = train(state, local)
            step += 1
            nonfinite = nonfinite + metrics["nonfinite_steps"]
            tokens = tokens + metrics["tokens"]
            last = step == self.total
            if step % log_every == 0 or last:
                m = to_python(metrics)
                new_nonfinite = int(jax.device_get(nonfinite))
                if new_nonfinite:
                    log.warning("%s: %d non-finite step(s) skipped up to step %d (params kept).",
                                self.name, new_nonfinite, step)  # fmt: skip
                nonfinite_total += new_nonfinite
                nonfinite = jnp.zeros((), jnp.float32)
                m["nonfinite_steps_total"] = nonfinite_total
                m["tokens_per_sec"] = bar.update(step - last_logged, m, float(tokens))
                m["padding_fraction"] = batching.padding_fraction(local)
                tokens, last_logged = jnp.zeros((), jnp.float32), step
                self.writer.write(self.name, step, m)
            if evaluate and (step % eval_every == 0 or last):
                self._log_eval(evaluate, state, step)
            if step % ckpt_every == 0 or last:
                data_state = {"iterators": devices_lib.all_process_states(train_iter.get_state()),
                              "nonfinite_steps": nonfinite_total}  # fmt: skip
                self.checkpointer.save(step, self.devices.to_checkpoint(state), data_state)
        bar.close()
        self.checkpointer.close()
        train_iter.close()
        return self.devices.params_of(state)

    # --- evaluation ---------------------------------------------------------------------

    def _log_eval(self, evaluate, state, step):
        totals: dict[str, float] = {}
        pairs = tokens = 0.0
        params = state.params
        batches = inputs.eval_iterator(self.splits, self.config, batch_size=self.local_batch,
                                       ref_logps=self.eval_ref_logps)  # fmt: skip
        for local in batches:
            m = to_python(evaluate(params, local))
            n = m.pop("pairs")
            tokens += m.pop("tokens")
            for k, v in m.items():  # per-batch means over real pairs -> weighted by pairs
                totals[k] = totals.get(k, 0.0) + v * n
            pairs += n
            if (
                self.config.eval.max_batches
                and pairs >= self.config.eval.max_batches * self.local_batch
            ):
                break
        metrics = {f"eval/{k}": v / max(pairs, 1.0) for k, v in totals.items()}
        metrics["eval/pairs"], metrics["eval/tokens"] = pairs, tokens
        self.writer.write(self.name, step, metrics)
        return metrics


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def _write_config(config, workdir):
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _export(model, params, tokenizer, workdir):
    """Writes the final policy as a Hugging Face directory `<workdir>/hf` (process 0)."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        path = os.path.join(workdir, "hf")
        models.to_hf(model, jax.device_get(params), path)
        tokenizer.save_pretrained(path)
        log.info("Exported the final policy to %s", path)


def summarize(workdir: str) -> str:
    """What DPO changed on the held-out pairs, read back from `<workdir>/metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["stage"] == "dpo" and "eval/loss" in r]
    if not evals:
        return "no DPO evaluation recorded"
    first, last = evals[0], evals[-1]
    rows = [
        ("reward accuracy", "rewards/accuracies"),
        ("log-prob accuracy", "logps/accuracies"),
        ("reward margin", "rewards/margins"),
        ("chosen reward", "rewards/chosen"),
        ("rejected reward", "rewards/rejected"),
        ("chosen log-prob", "logps/chosen"),
        ("rejected log-prob", "logps/rejected"),
        ("DPO loss", "loss"),
    ]
    lines = [f"Held-out pairs ({int(last['eval/pairs'])}): step {first['step']} -> {last['step']}"]
    for label, key in rows:
        lines.append(f"  {label:<18} {first['eval/' + key]:>10.4f} -> {last['eval/' + key]:>10.4f}")
    lines.append(
        "  (chance is 0.5; at step 0 the policy is the reference: rewards tie, accuracy 0)"
    )
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Runs (or resumes) every stage of `config` in `workdir`; returns the final params."""
    # --- process setup ---
    p = config.parallel
    parallel.initialize_distributed(p.coordinator_address or None, p.num_processes or None,
                                    None if p.process_id < 0 else p.process_id)  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    for stage in config.stages:
        if stage not in STAGES:
            raise ValueError(f"config.stages: unknown stage {stage!r}; expected {STAGES}")
    if "dpo" in config.stages and config.dpo.reference == "cached":
        needs = losses.get(config.dpo.loss.name).needs
        if any(f in needs for f in steps.REF_TOKEN_FIELDS):
            raise ValueError(f"loss {config.dpo.loss.name!r} needs per-token reference log-probs; "
                             "cached per-pair sums are not enough (set config.dpo.reference="
                             "'params')")  # fmt: skip
    if "dpo" in config.stages and config.dpo.reference == "none":
        if losses.requires_reference(config.dpo.loss.name):
            raise ValueError(f"loss {config.dpo.loss.name!r} needs a reference model "
                             "(set config.dpo.reference='params')")  # fmt: skip
    writer = MetricWriter(workdir, wandb_project=config.log.wandb_project,
                          config=config.to_dict())  # fmt: skip

    # --- data ---
    if jax.process_index() == 0 and config.data.synthetic:
        inputs.generate_synthetic(config.data, config.seed, os.path.join(workdir, "data"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data written")
    splits = inputs.load_splits(config, workdir)

    # --- model and devices ---
    model, host_params = build_model(config, len(splits.tokenizer))
    devices = Devices(config, model, jnp.zeros((1, 1), jnp.int32))
    initial_params = params = devices.initial_params(host_params, config.seed)

    # --- stages ---
    for name in config.stages:
        reference = None
        if name == "dpo":
            if config.dpo.init_from not in ("sft", "model"):
                raise ValueError(f"config.dpo.init_from={config.dpo.init_from!r}: sft | model")
            if config.dpo.init_from == "sft" and "sft" not in config.stages:
                raise ValueError("config.dpo.init_from='sft' needs 'sft' in config.stages")
            if config.dpo.init_from == "model":
                params = initial_params
            if config.dpo.reference == "params":
                reference = devices.reference(params)
            elif config.dpo.reference not in ("cached", "none"):
                raise ValueError(
                    f"config.dpo.reference={config.dpo.reference!r}: params | cached | none"
                )
        stage = Stage(name, config, workdir, devices, splits, writer, params, reference)
        # The stage owns its starting params now; holding no reference to them here lets it
        # free them (cached reference mode).
        params = reference = None
        if name == "dpo":
            initial_params = None
        params = stage.run()

    # --- export and summary ---
    if config.export_hf:
        _export(model, params, splits.tokenizer, workdir)
    writer.close()
    if jax.process_index() == 0 and "dpo" in config.stages:
        print(summarize(workdir), flush=True)
    return params
