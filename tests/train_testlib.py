"""Shared pieces of the train-step tests (test_train_steps.py, test_train_accumulation.py):
a 1-layer tiny DecoderLM, random params without compiling `model.init`, small preference
batches, and gradients read off one SGD step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from data_helpers import pack_pairs

from dpo_jax.data.batching import pad_pairs
from dpo_jax.data.examples import TokenizedPair
from dpo_jax.models import DecoderLM, ModelConfig
from dpo_jax.train import state as train_state
from dpo_jax.train import steps

L = 16
# On the first update the momentum trace equals the gradient, so new params = params - grads;
# and the optimizer has a state that the non-finite guard must keep.
SGD = optax.sgd(1.0, momentum=0.9)


def tiny_model() -> DecoderLM:
    return DecoderLM(
        ModelConfig.tiny(
            vocab_size=64,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            mlp_dim=64,
            max_position_embeddings=32,
        )  # fmt: skip
    )


def random_params(model, seed: int):
    """Params without compiling `model.init` (seconds on CPU): matrices ~ N(0, 0.02), 1-D
    params (norm scales) 1."""
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32)))
    )["params"]
    rng = np.random.default_rng(seed)

    def leaf(a):
        if len(a.shape) == 1:
            return jnp.ones(a.shape, a.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, a.shape).astype(a.dtype))

    return jax.tree.map(leaf, abstract)


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(3, 60, size=rng.integers(lo, hi)).tolist()
    return [TokenizedPair([1, *ids(0, 4)], [*ids(1, 6), 2], [*ids(1, 6), 2]) for _ in range(n)]


def padded_batch(pairs):
    # 5 real pairs in 8 slots: micro-batches of 2 hold 2, 2, 1, 0 real pairs.
    return pad_pairs(pairs, max_length=L, batch_size=8)


def packed_batch(pairs):
    batch, leftover = pack_pairs(pairs, num_rows=8, row_length=L, max_pairs=8)
    assert not leftover
    return batch


def sgd_state(params):
    return train_state.state_from_params(params, SGD, jax.random.PRNGKey(0))


def grads_of(state, new_state):
    """The gradient of one SGD(1.0) step: old params - new params."""
    return jax.tree.map(lambda a, b: np.asarray(a - b), state.params, new_state.params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def dpo_step(model, loss="sigmoid", **kwargs):
    objective = steps.Objective.create(loss, beta=0.1)
    return jax.jit(steps.make_dpo_step(model=model, tx=SGD, objective=objective, **kwargs))


# ------------------------------------------------------------------------------------------
# Fixtures shared by the train-step test files (registered by tests/conftest.py)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def policy(model):
    return random_params(model, 0)


@pytest.fixture(scope="module")
def reference(model):
    # A reference different from the policy, so that rewards and their gradients are not 0.
    return random_params(model, 1)


@pytest.fixture(scope="module")
def padded():
    return padded_batch(random_pairs(5))


@pytest.fixture(scope="module")
def packed():
    return packed_batch(random_pairs(5))
