"""The PPO stage (`ppo`): RLHF of the policy against a sequence reward, on a jit mesh.

One iteration, for B prompts of the training pairs (`ppo_rollout.PromptStream`):
  1. rollouts: one sample per prompt from the current policy (`dpo_jax.sampling`, KV cache,
     temperature 1, `ppo.max_new_tokens`, stops at EOS), with the iteration's key
     `fold_in(rollout_key, iteration)`;
  2. sequence reward on the host: `ppo.reward = "learned"` (this run's `rm` stage's reward
     model on the rows, or an exported classifier directory) or `"ground_truth"` (a text
     reward of `dpo_jax.evaluation.rewards`: VADER, a classifier, a substring count);
  3. ONE jitted scoring program (`ppo_rollout.score_rollout`): policy and reference
     log-probs and values of the response tokens, KL-shaped rewards, GAE, whitening;
  4. `ppo.epochs` passes of `ppo.num_minibatches` minibatches (a seeded permutation per
     iteration and epoch), each ONE jitted update (`make_ppo_step`): clipped policy loss +
     vf_coef x clipped value loss, one optimizer over policy and value params (TRL's
     PolicyAndValueWrapper), the same guarded update as the other stages;
  5. the KL controller (`losses.ppo.adaptive_kl_update`) from the batch's mean sequence KL.

The train state is `TrainState` with params `{"policy", "value"}`; the reference (the
policy's starting params) is frozen, has no optimizer state and is never donated. The value
model (`models.value.ValueModel`, a separate trunk) starts from this run's reward model when
it has an `rm` stage, else from the policy's trunk with a fresh head. A checkpoint holds the
state (both models, the optimizer state, the update count, the update key) and, as JSON, the
iteration, the prompt stream's position, the KL coefficient and the rollout key, so a killed
run resumes to the params an uninterrupted one reaches.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax import parallel, sampling
from dpo_jax.data.tokenize import pad_id_of
from dpo_jax.evaluation.rewards import HFClassifierReward
from dpo_jax.losses import ppo as ppo_math
from dpo_jax.models import reward as reward_model
from dpo_jax.models.value import ValueModel
from dpo_jax.train import ppo_rollout
from dpo_jax.train.checkpoints import StageCheckpointer
from dpo_jax.train.metrics import ProgressBar, to_python
from dpo_jax.train.optimizers import make_optimizer
from dpo_jax.train.state import TrainState
from dpo_jax.train.steps import DEFAULT_GUARD, Guard, apply_gradients
from dpo_jax.train.validate import STAGES, ppo_updates

log = logging.getLogger(__name__)

BATCH_FIELDS = ("tokens", "positions", "segment_ids", "mask")
TARGET_FIELDS = ("old_logps", "old_values", "advantages", "returns")

# ------------------------------------------------------------------------------------------
# The update
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PPOObjective:
    """The clipped PPO loss's options (static): loss = policy loss + vf_coef x value loss."""

    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1

    @classmethod
    def from_config(cls, ppo) -> PPOObjective:
        return cls(float(ppo.clip_range), float(ppo.clip_range_value), float(ppo.vf_coef))

    def loss(self, params, batch, *, policy, value) -> tuple[jax.Array, dict]:
        """(loss [], metrics) of a minibatch: `BATCH_FIELDS` rows [b, L] and mask [b, M],
        `TARGET_FIELDS` [b, M] from the rollout's scoring."""
        tokens, mask = batch["tokens"], batch["mask"]
        M = mask.shape[1]
        kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        logits = policy.apply({"params": params["policy"]}, tokens, **kwargs)
        logps = ppo_rollout.response_logps(logits, tokens, M)
        values = value.apply({"params": params["value"]}, tokens, **kwargs)
        values = ppo_rollout.response_values(values, M)
        policy_loss, policy_stats = ppo_math.clipped_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask, self.clip_range
        )
        value_loss, value_stats = ppo_math.clipped_value_loss(
            values, batch["old_values"], batch["returns"], mask, self.clip_range_value
        )
        entropy = ppo_rollout.response_entropy(jax.lax.stop_gradient(logits), M)
        metrics = {
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": ppo_math.masked_mean(entropy, mask),
            **policy_stats,
            **value_stats,
        }
        return policy_loss + self.vf_coef * value_loss, metrics


def _ppo_step(state: TrainState, batch, reference=None, *, policy, value, tx, objective, guard):
    if reference is not None:
        raise ValueError("the PPO update takes no reference (its log-probs are in the batch)")
    loss_fn = functools.partial(objective.loss, policy=policy, value=value)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    state, update_metrics = apply_gradients(state, grads, loss, tx, guard)
    return state, {"loss": loss, **metrics, **update_metrics}


def make_ppo_step(*, policy, value, tx, objective: PPOObjective | None = None,
                  guard: Guard = DEFAULT_GUARD):  # fmt: skip
    """`step(state, minibatch, reference=None) -> (state, metrics)`: one clipped PPO update
    of `state.params = {"policy", "value"}`; pure (jit it with a donated state)."""
    return functools.partial(_ppo_step, policy=policy, value=value, tx=tx,
                             objective=objective or PPOObjective(), guard=guard)  # fmt: skip


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


def process_rows(x: np.ndarray) -> np.ndarray:
    """This process's share of the leading (batch) axis of a global host array, which every
    process holds whole (the same prompts, samples and rewards everywhere)."""
    n, i = jax.process_count(), jax.process_index()
    size = x.shape[0] // n
    return x[i * size : (i + 1) * size]


class PPOStage:
    """Everything the PPO stage needs; `run()` trains to `ppo.steps` iterations and returns
    the policy params.

    devices: the policy's `Devices` (jit mode); init_params: the policy's (and reference's)
    starting params; reward: (RewardModel, params) of this run's `rm` stage, or None.
    """

    def __init__(self, config, workdir, devices, splits, writer, init_params, reward=None):
        self.config, self.ppo, self.devices = config, config.ppo, devices
        self.splits, self.writer = splits, writer
        self.total = int(self.ppo.steps)
        self.seed = config.seed + 1000 * (STAGES.index("ppo") + 1)
        self.checkpointer = StageCheckpointer(
            os.path.join(os.path.abspath(workdir), "checkpoints", "ppo"),
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
        )
        self.prompts = ppo_rollout.PromptStream(splits.pairs, self.seed)
        self.policy = devices.model
        self.value = ValueModel(reward_model.trunk_config(self.policy.config))
        abstract = jax.eval_shape(self.value.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        self.value_specs = parallel.param_logical_specs(abstract["params"])
        self.init_params = init_params
        self.reference = devices.reference(init_params)
        self.value_start = self._value_start(init_params, reward)
        self.reward = self._reward(reward)
        self.replicated = NamedSharding(devices.mesh, P())
        self.skipped = {"nonfinite": 0, "rejected": 0, "consecutive": 0}

    # --- build ------------------------------------------------------------------------

    def _value_start(self, policy_params, reward):
        """The value model's params: the reward model's when the run trained one (the same
        tree), else the policy's trunk with a fresh `score` head from the stage's seed."""
        if reward is not None:
            return reward[1]
        shape = (self.policy.config.hidden_size, 1)
        init_range = self.policy.config.initializer_range
        score = init_range * jax.random.normal(jax.random.key(self.seed), shape, jnp.float32)
        return reward_model.from_lm_params(policy_params, score)

    def _reward(self, reward):
        """The sequence reward: `f(prompts, tokens [B, M], lengths [B], rows) -> [B]`."""
        ppo, tokenizer = self.ppo, self.splits.tokenizer
        if ppo.reward == "ground_truth":
            return ppo_rollout.ground_truth_reward(ppo.ground_truth, tokenizer)
        if reward is None:  # an exported reward model sees the conversation, as trained
            classifier = HFClassifierReward(ppo.reward_path, with_prompt=True)
            return ppo_rollout.TextReward(classifier, tokenizer)
        model, params = reward
        mesh, rules = self.devices.mesh, self.devices.rules
        forward = jax.jit(
            lambda p, rows: model.apply(
                {"params": p}, rows["tokens"], rows["positions"], rows["segment_ids"]
            ),
            out_shardings=NamedSharding(mesh, P()),
        )

        def score_rows(p, rows):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                out = forward(p, self._global(rows))
            return np.asarray(out.addressable_data(0))

        return ppo_rollout.RowReward(params, score_rows)

    def _global(self, tree):
        """Global batch-sharded arrays of a host batch every process holds whole."""
        return parallel.shard_batch(jax.tree.map(process_rows, tree), self.devices.mesh)

    def _compile_scoring(self):
        options = ppo_rollout.RolloutOptions.from_config(self.ppo)
        fn = functools.partial(
            ppo_rollout.score_rollout, policy=self.policy, value=self.value, options=options
        )
        batch = parallel.batch_sharding(self.devices.mesh)
        ref = jax.tree.map(lambda x: x.sharding, self.reference)
        run = jax.jit(
            fn,
            in_shardings=(self.devices.state_shardings.params, ref, batch, batch, self.replicated),
            out_shardings=self.replicated,
        )
        mesh, rules = self.devices.mesh, self.devices.rules

        def score(params, rows, scores, kl_coef):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                out = run(params, self.reference, self._global(rows), self._global(scores),
                          jnp.float32(kl_coef))  # fmt: skip
            return {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}

        return score

    def _start(self, tx):
        """(state, progress): restored from the latest checkpoint, or fresh. progress: the
        iteration, prompt position, KL coefficient, rollout key and skipped-update counts."""
        base = jax.random.fold_in(jax.random.key(self.config.seed), STAGES.index("ppo"))
        # Two streams: update keys (the state's, `fold_in(rng, step)`) and rollout keys.
        state = self.devices.new_state(
            {"policy": self.init_params, "value": self.value_start},
            tx,
            jax.random.fold_in(base, 0),
            param_specs={"policy": self.devices.param_specs, "value": self.value_specs},
        )
        self.init_params = self.value_start = None  # the state holds its own copies
        progress = {
            "iteration": 0,
            "prompt_position": 0,
            "kl_coef": float(self.ppo.kl_coef),
            "rollout_key": [int(x) for x in jax.random.key_data(jax.random.fold_in(base, 1))],
            "nonfinite_steps": 0,
            "rejected_steps": 0,
            "score_moments": {"mean": 0.0, "var": 0.0, "count": 0},
        }
        restored = self.checkpointer.restore_latest(self.devices.checkpoint_target(state))
        step = 0
        if restored is not None:
            step, state, progress = restored
            self.skipped["nonfinite"] = progress["nonfinite_steps"]
            self.skipped["rejected"] = progress["rejected_steps"]
            log.info("ppo: resumed from iteration %d of %d.", step, self.total)
        # Iterations logged after the checkpoint (or before the first) are logged again.
        self.writer.drop_after("ppo", step)
        return state, progress

    # --- the loop ----------------------------------------------------------------------

    def run(self):
        tx = make_optimizer({**self.ppo.optimizer.to_dict(), "total_steps": ppo_updates(self.ppo)})
        state, progress = self._start(tx)
        guard = Guard(self.config.guard.max_update_ratio)
        objective = PPOObjective.from_config(self.ppo)
        step_fn = make_ppo_step(
            policy=self.policy, value=self.value, tx=tx, objective=objective, guard=guard
        )
        update = self.devices.compile(step_fn, None)
        score = self._compile_scoring()
        iteration = progress["iteration"]
        bar = ProgressBar("ppo", self.total, iteration, self.config.log.progress_bar)
        try:
            while iteration < self.total:
                state, metrics = self._iteration(state, progress, update, score)
                iteration = progress["iteration"] = iteration + 1
                bar.update(1, metrics, metrics.pop("tokens"))
                self.writer.write("ppo", iteration, metrics)
                if iteration % self.config.checkpoint.every_steps == 0 or iteration == self.total:
                    progress["nonfinite_steps"] = self.skipped["nonfinite"]
                    progress["rejected_steps"] = self.skipped["rejected"]
                    self.checkpointer.save(iteration, self.devices.to_checkpoint(state),
                                           dict(progress))  # fmt: skip
                self.checkpointer.check()
        finally:
            bar.close()
        self.checkpointer.close()
        return self.devices.params_of(state)["policy"]

    def _rollout(self, params, prompts, iteration: int, rollout_key):
        """Samples of the policy `params` on `prompts` with the iteration's key."""
        key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rollout_key, jnp.uint32)),
                                 iteration)  # fmt: skip
        tokenizer = self.splits.tokenizer
        return sampling.sample(
            self.policy,
            params,
            prompts,
            rng=key,
            max_new_tokens=int(self.ppo.max_new_tokens),
            temperature=1.0,
            eos_id=tokenizer.eos_token_id,
            pad_id=pad_id_of(tokenizer),
            mesh=self.devices.mesh,
            rules=self.devices.rules,
        )

    def _iteration(self, state, progress, update, score):
        """One rollout batch and its updates; advances `progress` (except the iteration)."""
        ppo, B, it = self.ppo, int(self.ppo.batch_size), progress["iteration"]
        prompts = self.prompts.batch(progress["prompt_position"], B)
        samples = self._rollout(state.params["policy"], prompts, it, progress["rollout_key"])
        rows = ppo_rollout.rollout_rows(prompts, samples.tokens, samples.lengths,
                                        self.prompts.width)  # fmt: skip
        scores = self.reward(prompts, samples.tokens, samples.lengths, rows)
        trained, progress["score_moments"] = ppo_rollout.normalize_scores(
            scores, progress["score_moments"], ppo.score_norm
        )
        kl_coef = progress["kl_coef"]
        out = score(state.params, rows, trained, kl_coef)
        batch = {
            **rows,
            "old_logps": out["logps"],
            "old_values": out["values"],
            "advantages": out["advantages"],
            "returns": out["returns"],
        }
        size = B // int(ppo.num_minibatches)
        sums, updates = None, 0
        for epoch in range(int(ppo.epochs)):
            order = np.random.default_rng([self.seed, it, epoch]).permutation(B)
            for k in range(int(ppo.num_minibatches)):
                idx = order[k * size : (k + 1) * size]
                minibatch = {name: process_rows(x[idx]) for name, x in batch.items()}
                state, m = update(state, minibatch)
                sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
                updates += 1
                self._check_skipped(m)
        metrics = {k: v / updates for k, v in to_python(sums).items()}
        for k in ("nonfinite_steps", "rejected_steps"):
            metrics[k] = round(metrics[k] * updates)
        mask = rows["mask"]
        kl = float(out["kl"].sum(axis=1).mean())  # per sequence, the configured estimator
        metrics.update(
            {
                "score": float(scores.mean()),
                "score_std": float(scores.std()),
                "kl": kl,
                "kl_coef": kl_coef,
                "non_score_reward": float(-kl_coef * out["kl"].sum(axis=1).mean()),
                "response_length": float(mask.sum(axis=1).mean()),
                "tokens": float(mask.sum() * updates / int(ppo.num_minibatches)),
            }
        )
        metrics["rlhf_reward"] = metrics["score"] + metrics["non_score_reward"]
        new_coef = ppo_math.adaptive_kl_update(kl_coef, kl, B, ppo.kl_target, ppo.kl_horizon)
        progress["kl_coef"] = float(new_coef)
        progress["prompt_position"] += B
        return state, metrics

    def _check_skipped(self, metrics) -> None:
        """Counts refused updates; stops the run after `guard.max_consecutive_skipped`."""
        nonfinite, rejected = (float(metrics[k]) for k in ("nonfinite_steps", "rejected_steps"))
        self.skipped["nonfinite"] += int(nonfinite)
        self.skipped["rejected"] += int(rejected)
        run = self.skipped["consecutive"] + 1 if nonfinite or rejected else 0
        self.skipped["consecutive"] = run
        limit = self.config.guard.max_consecutive_skipped
        if run >= limit:
            from dpo_jax.train.loop import TrainingAborted

            self.checkpointer.close()
            raise TrainingAborted(
                f"ppo: the last {run} updates were all skipped (non-finite or over the update "
                f"bound; limit config.guard.max_consecutive_skipped={limit}). The last "
                f"checkpoint in {self.checkpointer.directory} holds the last accepted params."
            )
