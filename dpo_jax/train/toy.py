"""A toy preference task and a small in-memory training driver, for tests and notebooks.

`marker_pairs` builds pairs that differ only in their last response token: chosen
responses end in one of `num_markers` "good" tokens, rejected ones in a "bad" token. A
policy separates them once it learns the two token sets, so a few dozen DPO steps on a tiny
model take held-out preference accuracy from chance to ~1.

`loss_curve` evaluates a registered loss along a sweep of log-ratio margins (the loss, its
implicit reward margin and its gradient weight), for plots of the loss family.

`train_on_pairs` runs the real jitted DPO step (`make_dpo_step`) and evaluation
(`make_eval_step`) on such pairs with the policy's initial params as the frozen reference;
it is the loop of `dpo_jax.train` without checkpoints, sharding or logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import losses
from dpo_jax.data.batching import pad_pairs
from dpo_jax.data.examples import TokenizedPair
from dpo_jax.train import optimizers, state, steps
from dpo_jax.train.scoring import pair_logps

BOS = 1


def marker_pairs(
    num_pairs: int,
    *,
    seed: int = 0,
    vocab_size: int = 64,
    prompt_length: int = 3,
    response_length: int = 2,
    num_markers: int = 8,
) -> list[TokenizedPair]:
    """Pairs separable by the last response token.

    prompt = BOS + `prompt_length` content tokens; both responses = the same
    `response_length` content tokens + a marker: chosen from the good set
    [V - 2m, V - m), rejected from the bad set [V - m, V) (m = num_markers, V = vocab_size).
    Content tokens are drawn from [2, V - 2m).
    """
    content_high = vocab_size - 2 * num_markers
    if content_high <= 2:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no content tokens with num_markers={num_markers}"
        )
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(num_pairs):
        prompt = [BOS, *rng.integers(2, content_high, prompt_length).tolist()]
        body = rng.integers(2, content_high, response_length).tolist()
        good = int(rng.integers(content_high, content_high + num_markers))
        bad = int(rng.integers(content_high + num_markers, vocab_size))
        pairs.append(TokenizedPair(prompt, [*body, good], [*body, bad]))
    return pairs


def init_params(model, seed: int = 0, length: int = 16):
    """Unboxed float32 params of `model` (e.g. a `DecoderLM`) from `model.init`, jitted."""
    tokens = jnp.zeros((1, length), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"]
    return nn.meta.unbox(boxed)


def preference_accuracy(params, batch, *, model) -> jax.Array:
    """Fraction of real pairs whose chosen response the model itself finds more likely."""
    logps = pair_logps(params, batch, model=model)
    real = batch["pair_mask"] != 0
    return jnp.where(real, logps[:, 0] > logps[:, 1], False).sum() / jnp.maximum(real.sum(), 1)


def train_on_pairs(
    model,
    params,
    train_pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    *,
    loss_name: str = "sigmoid",
    beta: float = 0.1,
    loss_hparams: Mapping[str, Any] | None = None,
    optimizer: Mapping[str, Any] | None = None,
    num_steps: int = 50,
    batch_size: int = 16,
    max_length: int = 16,
    eval_every: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """DPO-trains `params` on `train_pairs` (reference = the initial params).

    optimizer: `make_optimizer` fields (default AdamW, lr 3e-3, 5 warmup steps).
    Returns {"train": per-step metrics, "eval": held-out metrics at steps 0, eval_every,
    ..., num_steps (each with "step" and "policy_accuracy" added)}; values are Python floats.
    The eval set is scored as one batch.
    """
    opt = {"name": "adamw", "learning_rate": 3e-3, "warmup_steps": 5, "max_grad_norm": 10.0}
    tx = optimizers.make_optimizer({**opt, **(optimizer or {})})
    reference = params
    train_state = state.state_from_params(params, tx, jax.random.PRNGKey(seed))
    objective = steps.Objective.create(loss_name, beta, loss_hparams)
    step = jax.jit(steps.make_dpo_step(model=model, tx=tx, objective=objective))
    evaluate = jax.jit(steps.make_eval_step(model=model, objective=objective))
    accuracy = jax.jit(lambda p, b: preference_accuracy(p, b, model=model))
    eval_batch = pad_pairs(eval_pairs, max_length=max_length)

    def run_eval(step_num, p):
        metrics = {k: float(v) for k, v in evaluate(p, eval_batch, reference).items()}
        metrics.update(step=step_num, policy_accuracy=float(accuracy(p, eval_batch)))
        return metrics

    rng = np.random.default_rng(seed)
    order: list[int] = []
    history: dict[str, Any] = {"train": [], "eval": [run_eval(0, params)]}
    for i in range(1, num_steps + 1):
        if len(order) < batch_size:  # reshuffle per epoch; a partial tail joins the next
            order += rng.permutation(len(train_pairs)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        batch = pad_pairs([train_pairs[j] for j in chosen], max_length=max_length)
        train_state, metrics = step(train_state, batch, reference)
        history["train"].append({k: float(v) for k, v in metrics.items()})
        if i % eval_every == 0 or i == num_steps:
            history["eval"].append(run_eval(i, train_state.params))
    history["params"] = train_state.params
    return history


def loss_curve(
    loss: str | losses.Loss,
    log_ratio_margins,
    *,
    beta: float = 0.1,
    base_logps: float = -30.0,
    length: float = 30.0,
    **hparams,
) -> dict[str, np.ndarray]:
    """A loss along a sweep of pairs whose log-ratio margin `m = c - r` varies.

    Pair i has reference log-probs `base_logps` on both sides, policy log-probs
    `base_logps + m_i / 2` (chosen) and `base_logps - m_i / 2` (rejected), and `length` scored
    tokens per response, so reference-free losses see the same policy log-probs. Losses on
    per-token log-probs (e.g. unlikelihood) see each sum spread evenly over `length` tokens.
    log_ratio_margins: [B] increasing, B >= 2 (order-based losses such as AOT sort the batch).
    Returns numpy [B] arrays: `reward_margin` (the loss's own chosen - rejected reward; for
    DPO `beta * m`), `loss`, and `weight = -d loss / d reward_margin` (how hard a gradient
    step pushes that pair's margin up; DPO: `sigma(-beta m)`).
    """
    fn = losses.get(loss)
    m = jnp.asarray(log_ratio_margins, jnp.float32)
    if m.ndim != 1 or m.shape[0] < 2:
        raise ValueError(f"log_ratio_margins must be a 1-D sweep of >= 2 values, got {m.shape}")
    ones = jnp.ones_like(m)
    num_tokens = max(int(round(length)), 1)
    token_mask = jnp.ones((m.shape[0], num_tokens), jnp.float32)

    def per_token(sums):  # [B] -> [B, num_tokens], same sum
        return jnp.broadcast_to((sums / num_tokens)[:, None], token_mask.shape)

    def evaluate(m):
        chosen, rejected = base_logps + m / 2, base_logps - m / 2
        lp = losses.PreferenceLogps(
            chosen_logps=chosen, rejected_logps=rejected,
            ref_chosen_logps=base_logps * ones, ref_rejected_logps=base_logps * ones,
            chosen_lengths=length * ones, rejected_lengths=length * ones,
            chosen_token_logps=per_token(chosen), rejected_token_logps=per_token(rejected),
            chosen_loss_mask=token_mask, rejected_loss_mask=token_mask,
        )  # fmt: skip
        out = fn(lp, beta=beta, **hparams)
        return out.losses, out.chosen_rewards - out.rejected_rewards

    (loss_values, reward_margin), (dloss, _) = jax.jvp(evaluate, (m,), (ones,))
    # Rewards are stop_gradient'ed inside the losses (so autodiff gives d margin / d m = 0);
    # they are linear in m, so differences along the sweep give the slope exactly.
    reward_margin = np.asarray(reward_margin)
    dmargin = np.gradient(reward_margin, np.asarray(m))
    weight = -np.asarray(dloss) / np.where(dmargin == 0, np.nan, dmargin)
    return {
        "log_ratio_margin": np.asarray(m),
        "reward_margin": reward_margin,
        "loss": np.asarray(loss_values),
        "weight": weight,
    }
