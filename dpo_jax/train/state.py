"""The train state: step, policy params, optimizer state, base PRNG key.

The frozen reference is *not* part of the state: it has no optimizer state, is never
donated, and is passed to the step as a separate argument (see `dpo_jax.train.steps`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a step updates; a pytree, so it can be jitted, sharded and checkpointed.

    step: [] int32, optimizer steps taken so far (non-finite steps included).
    params: the policy's parameter pytree (float32 arrays).
    opt_state: the optimizer state for `params`.
    rng: [2] uint32 raw key data (checkpointable as a plain array). It is never consumed:
      step t derives its key as `fold_in(rng, t)` (see `step_key`), so no key is reused and
      a resumed run draws the same keys it would have drawn uninterrupted.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def state_from_params(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state around existing params (e.g. imported from Hugging Face, or the end of
    the SFT stage): step 0, new optimizer state, base key `rng`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=raw_key(rng)
    )


def step_key(state: TrainState) -> jax.Array:
    """The key of the current step: `fold_in(state.rng, state.step)`, never reused."""
    return jax.random.fold_in(state.rng, state.step)
