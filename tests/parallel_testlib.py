"""Shared pieces of the sharding tests (test_parallel.py) and of the 2-process run
(multihost_worker.py): a tiny DecoderLM, fixed random padded DPO batches, and drivers that
train a few steps of the real DPO step (`dpo_jax.train.steps`) on a mesh (jit) or with
pmap, returning the losses and the final params as numpy."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import parallel
from dpo_jax.models import DecoderLM, ModelConfig
from dpo_jax.train.optimizers import make_optimizer
from dpo_jax.train.state import TrainState, raw_key
from dpo_jax.train.steps import make_dpo_step

NUM_PAIRS = 8  # B
LENGTH = 16  # L
VOCAB = 256  # V
# Cheaper XLA compilation on CPU; numerics are unaffected at float32 tolerances.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def create_train_state(model, tx, rng, example_tokens, *, unbox: bool = True) -> TrainState:
    """A step-0 state from `model.init` (pure: runs under `jax.eval_shape` or a sharded jit).
    unbox=False keeps the `nn.LogicallyPartitioned` boxes, for reading logical axis names."""
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, example_tokens)["params"]
    if unbox:
        params = nn.meta.unbox(params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), raw_key(state_rng))


def tiny_model() -> DecoderLM:
    return DecoderLM(ModelConfig.tiny("llama", vocab_size=VOCAB))


def make_batch(seed: int, num_pairs: int = NUM_PAIRS) -> dict[str, np.ndarray]:
    """Padded DPO batch: tokens/positions/segment_ids/loss_mask [B, 2, L], pair_mask [B].

    Prompts of 3-6 tokens, responses of 2-8 tokens (response tokens scored), right padding.
    """
    rng = np.random.default_rng(seed)
    shape = (num_pairs, 2, LENGTH)
    tokens = rng.integers(1, VOCAB, size=shape).astype(np.int32)
    segment_ids = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.int32)
    for b in range(num_pairs):
        prompt = int(rng.integers(3, 7))
        for side in range(2):
            response = int(rng.integers(2, 9))
            segment_ids[b, side, : prompt + response] = 1
            loss_mask[b, side, prompt : prompt + response] = 1
    return {
        "tokens": tokens * segment_ids,
        "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), shape).copy(),
        "segment_ids": segment_ids,
        "loss_mask": loss_mask,
        "pair_mask": np.ones((num_pairs,), np.int32),
    }


def optimizer():
    # SGD with momentum: an optimizer state that mirrors the params (so its sharding is
    # exercised) without Adam/RMSprop's sign-like first steps, which would turn rounding
    # differences of reduction order into lr-sized parameter differences.
    return make_optimizer({"name": "sgd", "learning_rate": 0.5, "momentum": 0.9, "warmup_steps": 0})


def make_init(model, tx, *, unbox: bool):
    example = jnp.zeros((1, LENGTH), jnp.int32)
    return lambda rng: create_train_state(model, tx, rng, example, unbox=unbox)


def to_numpy(tree):
    """Full values on every process (global arrays are gathered across processes)."""

    def one(x):
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(one, tree)


@functools.lru_cache
def initial_state(seed: int = 0):
    """(abstract boxed TrainState, host TrainState of numpy arrays) of the tiny model."""
    model, tx = tiny_model(), optimizer()
    init = make_init(model, tx, unbox=False)
    abstract = jax.eval_shape(init, jax.random.key(seed))
    state = jax.jit(lambda rng: parallel.unbox(init(rng)), compiler_options=FAST_COMPILE)(
        jax.random.key(seed)
    )
    return abstract, to_numpy(state)


def run_jit(mesh, local_batches, *, seed=0, reference_rules="same", rules=None):
    """Trains len(local_batches) steps on `mesh`; returns (losses [steps], params numpy).

    local_batches: this process's part of each global batch (all of it with one process).
    The reference is the initial policy.
    """
    rules = parallel.DEFAULT_RULES if rules is None else rules
    model, tx = tiny_model(), optimizer()
    abstract, host = initial_state(seed)
    # Boxed abstract state: the optimizer moments carry the params' logical names too.
    shardings = parallel.state_shardings(abstract, mesh, rules)
    reference_shardings = parallel.state_shardings(
        abstract.params, mesh, parallel.REFERENCE_RULES[reference_rules]
    )
    state = parallel.put_sharded(host, shardings)
    reference = parallel.put_sharded(host.params, reference_shardings)
    step = parallel.jit_step(
        make_dpo_step(model=model, tx=tx),
        mesh,
        shardings,
        reference_shardings,
        parallel.batch_sharding(mesh),
        rules=rules,
        compiler_options=FAST_COMPILE,
    )
    losses = []
    for local in local_batches:
        state, metrics = step(state, parallel.shard_batch(local, mesh), reference)
        losses.append(float(metrics["loss"]))
    return np.array(losses), to_numpy(state.params)


def run_pmap(batches, *, seed=0):
    """The same training with `parallel.pmap_step` over all local devices."""
    model, tx = tiny_model(), optimizer()
    _, host = initial_state(seed)
    reference = parallel.replicate(host.params)
    state = parallel.replicate(host)
    step = parallel.pmap_step(make_dpo_step(model=model, tx=tx, axis_name=parallel.PMAP_AXIS))
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch_pmap(batch), reference)
        losses.append(float(parallel.unreplicate(metrics)["loss"]))
    return np.array(losses), to_numpy(parallel.unreplicate(state.params))
