"""Optimizers and schedules: parity with torch.optim on a small least-squares problem."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from dpo_jax.train import optimizers

STEPS = 25


def _problem():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.normal(size=(4,)).astype(np.float32)
    xs = rng.normal(size=(STEPS, 8, 6)).astype(np.float32)
    ys = rng.normal(size=(STEPS, 8, 4)).astype(np.float32)
    return {"w": w, "b": b}, xs, ys


def _jax_loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _run_jax(config, params, xs, ys):
    tx = optimizers.make_optimizer(config)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    lrs = []

    @jax.jit
    def update(params, state, x, y):
        grads = jax.grad(_jax_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for x, y in zip(xs, ys, strict=True):
        params, state = update(params, state, x, y)
        lrs.append(float(optimizers.learning_rate_from_state(state)))
    return jax.tree.map(np.asarray, params), np.array(lrs)


def _run_torch(make_opt, lr_lambda, params, xs, ys, max_grad_norm):
    w = torch.tensor(params["w"], requires_grad=True)
    b = torch.tensor(params["b"], requires_grad=True)
    opt = make_opt([w, b])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lr_lambda)
    lrs = []
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        loss = torch.mean((torch.tensor(x) @ w + b - torch.tensor(y)) ** 2)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([w, b], max_grad_norm)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {"w": w.detach().numpy(), "b": b.detach().numpy()}, np.array(lrs)


def _assert_close(jax_params, torch_params, rtol=2e-5, atol=1e-6):
    for k in jax_params:
        np.testing.assert_allclose(jax_params[k], torch_params[k], rtol=rtol, atol=atol)


def _dpo_warmup(warmup):
    # The paper's reference code: LambdaLR(lambda step: min(1, (step + 1) / (warmup + 1))).
    return lambda step: min(1.0, (step + 1) / (warmup + 1))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_rmsprop_matches_torch(momentum):
    params, xs, ys = _problem()
    lr, warmup = 3e-2, 10
    config = ml_collections.ConfigDict(
        dict(
            name="rmsprop",
            learning_rate=lr,
            warmup_steps=warmup,
            max_grad_norm=0.0,
            momentum=momentum,
        )
    )
    got, got_lrs = _run_jax(config, params, xs, ys)
    want, want_lrs = _run_torch(
        lambda p: torch.optim.RMSprop(p, lr=lr, momentum=momentum),
        _dpo_warmup(warmup),
        params,
        xs,
        ys,
        None,
    )
    np.testing.assert_allclose(got_lrs, want_lrs, rtol=1e-6)
    _assert_close(got, want)
    # And the optax defaults would not have matched: the test can tell the two apart.
    assert not np.allclose(
        _run_jax({**config.to_dict(), "rmsprop_decay": 0.9}, params, xs, ys)[0]["w"],
        want["w"],
        rtol=2e-5,
        atol=1e-6,
    )


def test_rmsprop_with_clipping_matches_torch():
    params, xs, ys = _problem()
    lr, warmup, clip = 1e-2, 5, 0.5
    config = dict(name="rmsprop", learning_rate=lr, warmup_steps=warmup, max_grad_norm=clip)
    got, _ = _run_jax(config, params, xs, ys)
    want, _ = _run_torch(
        lambda p: torch.optim.RMSprop(p, lr=lr), _dpo_warmup(warmup), params, xs, ys, clip
    )
    # torch divides by (norm + 1e-6) when clipping, optax by norm: ~1e-6 relative apart.
    _assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_adamw_cosine_matches_torch():
    params, xs, ys = _problem()
    lr, warmup, total, floor, wd = 5e-2, 5, 20, 0.1, 0.05
    config = dict(
        name="adamw",
        learning_rate=lr,
        warmup_steps=warmup,
        schedule="cosine",
        total_steps=total,
        min_learning_rate_ratio=floor,
        weight_decay=wd,
        decay_1d_params=True,
        max_grad_norm=None,
        b2=0.99,
        eps=1e-6,
    )

    def lr_lambda(step):
        warm = min(1.0, (step + 1) / (warmup + 1))
        progress = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    got, got_lrs = _run_jax(config, params, xs, ys)
    want, want_lrs = _run_torch(
        lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd),
        lr_lambda,
        params,
        xs,
        ys,
        None,
    )
    np.testing.assert_allclose(got_lrs, want_lrs, rtol=1e-6)
    assert got_lrs[-1] == pytest.approx(lr * floor, rel=1e-6)  # past total_steps: the floor
    _assert_close(got, want)


def test_adamw_skips_1d_params_by_default():
    params, xs, ys = _problem()
    lr, wd = 1e-2, 0.5
    config = dict(
        name="adamw", learning_rate=lr, warmup_steps=0, weight_decay=wd, max_grad_norm=0.0, eps=1e-6
    )
    got, _ = _run_jax(config, params, xs, ys)
    want, _ = _run_torch(
        lambda p: torch.optim.AdamW(
            [{"params": [p[0]], "weight_decay": wd}, {"params": [p[1]], "weight_decay": 0.0}],
            lr=lr,
        ),
        lambda step: 1.0,
        params,
        xs,
        ys,
        None,
    )
    _assert_close(got, want)
    # The decay matters at this size: decaying b too gives a visibly different result.
    assert not np.allclose(
        _run_jax({**config, "decay_1d_params": True}, params, xs, ys)[0]["b"],
        want["b"],
        rtol=2e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True)])
def test_sgd_matches_torch(momentum, nesterov):
    params, xs, ys = _problem()
    lr, warmup = 1e-2, 3
    config = dict(
        name="sgd",
        learning_rate=lr,
        warmup_steps=warmup,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=0.01,
        decay_1d_params=True,
        max_grad_norm=0.0,
    )
    got, _ = _run_jax(config, params, xs, ys)
    want, _ = _run_torch(
        lambda p: torch.optim.SGD(
            p, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.01
        ),
        _dpo_warmup(warmup),
        params,
        xs,
        ys,
        None,
    )
    _assert_close(got, want)


def test_paper_schedule_values():
    schedule = optimizers.make_schedule(optimizers.default_optimizer_config())
    lrs = np.array([float(schedule(t)) for t in (0, 74, 149, 150, 10_000)])
    np.testing.assert_allclose(
        lrs, 1e-6 * np.array([1 / 151, 75 / 151, 150 / 151, 1, 1]), rtol=1e-6
    )


def test_linear_schedule_values():
    schedule = optimizers.make_schedule(
        dict(
            learning_rate=1.0,
            warmup_steps=0,
            schedule="linear",
            total_steps=10,
            min_learning_rate_ratio=0.5,
        )
    )
    np.testing.assert_allclose(
        [float(schedule(t)) for t in (0, 5, 10, 20)], [1.0, 0.75, 0.5, 0.5], rtol=1e-6
    )


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(name="adam"), "'name'"),
        (dict(learning_rat=1.0), "unknown field"),
        (dict(schedule="cosine", total_steps=10, warmup_steps=150), "'total_steps'"),
        (dict(learning_rate=0.0), "'learning_rate'"),
        (dict(schedule="step"), "'schedule'"),
    ],
)
def test_bad_config_names_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        optimizers.make_optimizer(config)
