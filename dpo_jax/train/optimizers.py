"""Optimizers and learning-rate schedules built from a config.

The DPO paper (Rafailov et al. 2023, App. B) trains with RMSprop, learning rate 1e-6, a
linear warmup over 150 steps and a constant rate afterwards; its reference code uses
`torch.optim.RMSprop` defaults (alpha 0.99, eps 1e-8 added *outside* the square root, no
momentum), a `LambdaLR` warmup factor `min(1, (step + 1) / (warmup_steps + 1))` and
gradient clipping at global norm 10. `make_optimizer` reproduces that exactly (the optax
defaults differ: decay 0.9 and eps inside the square root), plus AdamW (torch semantics:
decoupled weight decay) with warmup + cosine decay, and SGD.

The whole chain is wrapped in `optax.inject_hyperparams`, so the learning rate applied by
the latest update is readable from the optimizer state (`learning_rate_from_state`) at no
cost, and it stays right when a non-finite step leaves the optimizer state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("rmsprop", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The paper's optimizer setup; every field is documented here once."""
    c = ml_collections.ConfigDict()
    # One of OPTIMIZERS. "rmsprop" = torch.optim.RMSprop semantics (the DPO paper).
    c.name = "rmsprop"
    # Peak learning rate, reached at the end of warmup (paper: 1e-6 for DPO).
    c.learning_rate = 1e-6
    # Linear warmup length in optimizer updates; factor min(1, (t + 1) / (warmup + 1)) at
    # update t (0-based), as in the paper's reference code. 0 = no warmup.
    c.warmup_steps = 150
    # Shape after warmup, one of SCHEDULES: "constant" (paper), "cosine" or "linear" decay
    # from the peak to min_learning_rate_ratio * peak at update total_steps.
    c.schedule = "constant"
    # Number of optimizer updates of the run; needed by "cosine"/"linear", ignored otherwise.
    c.total_steps = 0
    # Final learning rate of "cosine"/"linear" as a fraction of the peak.
    c.min_learning_rate_ratio = 0.0
    # Clip gradients to this global L2 norm before the optimizer (paper code: 10.0).
    # 0 or None disables clipping.
    c.max_grad_norm = 10.0
    # adamw: decoupled weight decay (torch.optim.AdamW: p -= lr * wd * p).
    # rmsprop / sgd: L2 penalty added to the gradient (torch's weight_decay argument).
    c.weight_decay = 0.0
    # Also decay 1-D parameters (norm scales, biases). False follows the common practice of
    # the HF Trainer (TRL's default) of decaying matrices only; torch's plain optimizers
    # decay everything (True).
    c.decay_1d_params = False
    # rmsprop: decay of the squared-gradient average (torch's `alpha`).
    c.rmsprop_decay = 0.99
    # adamw: first / second moment decays (torch's betas).
    c.b1 = 0.9
    c.b2 = 0.999
    # Denominator epsilon of rmsprop and adamw, added outside the square root (torch).
    c.eps = 1e-8
    # rmsprop / sgd: heavy-ball momentum (torch semantics); 0 = none.
    c.momentum = 0.0
    # sgd: Nesterov momentum.
    c.nesterov = False
    return c


def _resolve(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `config`; unknown fields and bad values are errors."""
    defaults = default_optimizer_config().to_dict()
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"optimizer config: unknown field(s) {unknown}; known fields: {sorted(defaults)}"
        )
    c = {**defaults, **given}
    if c["name"] not in OPTIMIZERS:
        raise ValueError(
            f"optimizer config: field 'name'={c['name']!r}, expected one of {OPTIMIZERS}"
        )
    if c["schedule"] not in SCHEDULES:
        raise ValueError(
            f"optimizer config: field 'schedule'={c['schedule']!r}, expected one of {SCHEDULES}"
        )
    if not c["learning_rate"] > 0:
        raise ValueError(
            f"optimizer config: field 'learning_rate'={c['learning_rate']} must be > 0"
        )
    if c["warmup_steps"] < 0:
        raise ValueError(f"optimizer config: field 'warmup_steps'={c['warmup_steps']} must be >= 0")
    if c["schedule"] != "constant" and c["total_steps"] <= c["warmup_steps"]:
        raise ValueError(
            f"optimizer config: schedule {c['schedule']!r} needs field 'total_steps' "
            f"({c['total_steps']}) > 'warmup_steps' ({c['warmup_steps']})"
        )
    if c["max_grad_norm"] is not None and c["max_grad_norm"] < 0:
        raise ValueError(
            f"optimizer config: field 'max_grad_norm'={c['max_grad_norm']} must be >= 0"
        )
    return c


def make_schedule(config: ml_collections.ConfigDict | Mapping[str, Any]) -> optax.Schedule:
    """Learning rate as a function of the 0-based optimizer update count.

    lr(t) = learning_rate * min(1, (t + 1) / (warmup_steps + 1)) * decay(t), where decay is
    1 ("constant"), or goes from 1 at t = warmup_steps to min_learning_rate_ratio at
    t = total_steps along a half cosine ("cosine") or a line ("linear"), then stays there.
    """
    c = _resolve(config)
    peak, warmup = float(c["learning_rate"]), int(c["warmup_steps"])
    kind, total, floor = c["schedule"], int(c["total_steps"]), float(c["min_learning_rate_ratio"])

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        factor = jnp.minimum(1.0, (t + 1.0) / (warmup + 1.0))
        if kind != "constant":
            progress = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
            if kind == "cosine":
                shape = 0.5 * (1.0 + jnp.cos(math.pi * progress))
            else:
                shape = 1.0 - progress
            factor = factor * (floor + (1.0 - floor) * shape)
        return peak * factor

    return schedule


def _decay_mask(decay_1d_params: bool):
    if decay_1d_params:
        return None
    return lambda params: jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    config: ml_collections.ConfigDict | Mapping[str, Any],
) -> optax.GradientTransformation:
    """The optimizer described by `config` (fields: see `default_optimizer_config`).

    Order of the chain: global-norm clipping, then the optimizer with the scheduled rate.
    Unknown fields or invalid values raise ValueError naming the field.
    """
    c = _resolve(config)
    mask = _decay_mask(bool(c["decay_1d_params"]))
    momentum = float(c["momentum"]) or None

    def chain(learning_rate):
        parts = []
        if c["max_grad_norm"]:
            parts.append(optax.clip_by_global_norm(float(c["max_grad_norm"])))
        if c["name"] == "adamw":
            parts.append(
                optax.adamw(
                    learning_rate,
                    b1=float(c["b1"]),
                    b2=float(c["b2"]),
                    eps=float(c["eps"]),
                    weight_decay=float(c["weight_decay"]),
                    mask=mask,
                )
            )
            return optax.chain(*parts)
        # torch's RMSprop / SGD weight decay is an L2 term added to the gradient.
        if c["weight_decay"]:
            parts.append(optax.add_decayed_weights(float(c["weight_decay"]), mask=mask))
        if c["name"] == "rmsprop":
            # Built by hand: optax.rmsprop applies the rate *before* its momentum trace,
            # torch after it, which differs as soon as the rate changes (warmup).
            parts.append(
                optax.scale_by_rms(
                    decay=float(c["rmsprop_decay"]),
                    eps=float(c["eps"]),
                    initial_scale=0.0,
                    eps_in_sqrt=False,
                )
            )
            if momentum:
                parts.append(optax.trace(decay=momentum))
            parts.append(optax.scale_by_learning_rate(learning_rate))
        else:
            parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=bool(c["nesterov"])))
        return optax.chain(*parts)

    return optax.inject_hyperparams(chain)(learning_rate=make_schedule(c))


def learning_rate_from_state(opt_state: Any) -> jax.Array | None:
    """Learning rate used by the latest update of a `make_optimizer` state (None otherwise).

    Before the first update this is the rate the first update will use.
    """
    hyperparams = getattr(opt_state, "hyperparams", None)
    if isinstance(hyperparams, Mapping) and "learning_rate" in hyperparams:
        return hyperparams["learning_rate"]
    return None
