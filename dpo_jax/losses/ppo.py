"""PPO for language models (RLHF): KL-shaped rewards, GAE, clipped losses, the KL controller.

The paper's RLHF baseline (DPO, arXiv 2305.18290, Sec. 3 and 6) is PPO (Schulman et al. 2017,
arXiv 1707.06347) on a per-token reward shaped with a KL penalty to the reference (Ziegler et
al. 2019, arXiv 1909.08593; Stiennon et al. 2020, arXiv 2009.01325). These are its pure
pieces; the rollout and update loop lives in dpo_jax/train.

Shapes: B rollouts, M response tokens. `mask: [B, M]` is 1 on real generated tokens,
left-aligned (tokens 0..len-1 of each row), 0 on padding after the stop token. Every [B, M]
array a masked function returns is 0 on masked entries, and masked entries may hold anything
(even NaN or inf): they are replaced with `where` before any arithmetic, so neither their
value nor their gradient leaks. Math runs in float32 whatever the input dtype.

What TRL does (checked against huggingface/trl: `trl/core.py` and `trl/trainer/ppo_trainer.py`
of the 0.x `PPOTrainer`, and `trl/experimental/ppo/ppo_trainer.py` at commit d6196b6; the
installed TRL 1.16.0 ships neither) and where we differ:
  * KL shaping and GAE are TRL's `compute_rewards` / `compute_advantages`. TRL's newer trainer
    adds the score one token after the last real one (its values run one token longer); we add
    it at the last real token, the state after which the episode ends.
  * The losses and stats are TRL's (0.x `PPOTrainer.loss`). Its newer trainer takes
    `approx_kl` and the ratio mean over padding too (where its log-probs are filled so that the
    ratio is exactly 1); here, as in 0.x, they are masked means.
tests/test_ppo_math.py checks all of this against TRL 0.11.4's functions when an 0.x TRL is
importable.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "KL_KINDS",
    "KLControllerState",
    "adaptive_kl_update",
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae",
    "masked_mean",
    "masked_var",
    "per_token_kl",
    "shaped_rewards",
    "whiten",
]

KL_KINDS = ("k1", "abs", "mse", "k3")
# Added to the variance before the inverse square root in `whiten`, as TRL's masked_whiten.
WHITEN_EPS = 1e-8


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _check_shapes(fn: str, mask, **arrays) -> None:
    for name, x in arrays.items():
        if jnp.shape(x) != jnp.shape(mask):
            raise ValueError(
                f"ppo.{fn}: {name} has shape {jnp.shape(x)}, mask has {jnp.shape(mask)}; "
                "both must be [B, M]"
            )


def _positive(fn: str, name: str, value) -> None:
    """Checks `value > 0` when it is a Python number (a traced value cannot be checked)."""
    if isinstance(value, int | float) and not value > 0:
        raise ValueError(f"ppo.{fn}: {name} must be > 0, got {value}")


# ----------------------------------------------------------------------------------------
# Masked statistics (TRL's masked_mean / masked_var / masked_whiten)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """`sum(x * m) / sum(m)` over the real entries: any shape -> [] (or reduced over `axis`).

    0 where the mask is empty (TRL divides by zero there).
    """
    m = jnp.asarray(mask) > 0
    total = jnp.sum(jnp.where(m, jnp.asarray(x, jnp.float32), 0.0), axis=axis)
    return total / jnp.maximum(jnp.sum(m, axis=axis), 1).astype(jnp.float32)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of the real entries of x (all axes together) -> [].

    `unbiased=True` applies Bessel's correction `n / (n - 1)` (n = number of real entries) to
    the mean squared deviation, as TRL's masked_var; False returns the plain mean squared
    deviation. With n < 2 the variance is 0 (TRL raises for n = 0 and divides by zero at n = 1).
    """
    m = jnp.asarray(mask) > 0
    x = jnp.asarray(x, jnp.float32)
    var = masked_mean((x - masked_mean(x, m)) ** 2, m)
    if unbiased:
        n = jnp.sum(m).astype(jnp.float32)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """TRL's masked_whiten: `(x - mean) / sqrt(var + 1e-8)` over the real entries -> x's shape.

    mean and var are `masked_mean`, `masked_var(unbiased=True)` (Bessel-corrected, as TRL).
    `shift_mean=False` adds the mean back (unit variance, original mean): TRL whitens rewards
    that way and advantages with `shift_mean=True`. Masked entries are 0 (TRL leaves them
    whitened and masks them afterwards).
    """
    m = jnp.asarray(mask) > 0
    x = jnp.where(m, jnp.asarray(x, jnp.float32), 0.0)
    mean = masked_mean(x, m)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, m) + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)


# ----------------------------------------------------------------------------------------
# Rewards and advantages


def per_token_kl(logps: jax.Array, ref_logps: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token KL estimate from the sampled tokens' log-probs: [B, M] x2 -> [B, M] float32.

    With `d = log pi(y_t) - log pi_ref(y_t)` for the sampled token y_t:
      "k1":  d              (unbiased for KL(pi || pi_ref), TRL kl_penalty "kl" / estimator "k1")
      "abs": |d|            (TRL kl_penalty "abs")
      "mse": d^2 / 2        (TRL kl_penalty "mse")
      "k3":  exp(-d) - 1 + d  (Schulman's low-variance, non-negative estimator; TRL's newer
             trainer's kl_estimator "k3")
    TRL's "full" needs the whole next-token distributions and is not offered.
    """
    logps, ref_logps = _f32(logps, ref_logps)
    d = logps - ref_logps
    if kind == "k1":
        return d
    if kind == "abs":
        return jnp.abs(d)
    if kind == "mse":
        return 0.5 * d**2
    if kind == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"ppo.per_token_kl: unknown kind {kind!r}; known: {KL_KINDS}")


def last_token_onehot(mask: jax.Array) -> jax.Array:
    """[B, M] -> [B, M] bool, True at the last real token of each row (none if the row is empty)."""
    m = jnp.asarray(mask) > 0
    idx = jnp.arange(m.shape[-1])
    last = jnp.max(jnp.where(m, idx, -1), axis=-1, keepdims=True)
    return idx == last


def shaped_rewards(scores, logps, ref_logps, mask, kl_coef, kind: str = "k1"):
    """Per-token RLHF reward (Ziegler et al. 2019, arXiv 1909.08593, Eq. 2; TRL compute_rewards).

    `r_t = -kl_coef * kl_t + [t = last real token] * score`, kl_t = `per_token_kl(kind)`:
    the KL penalty on every generated token, the sequence reward (learned RM or ground truth)
    once, at the end of the episode.

    Args:
      scores: [B] sequence rewards.
      logps, ref_logps: [B, M] sampled-token log-probs under the policy and the reference.
      mask: [B, M] real generated tokens.
      kl_coef: [] or float, beta_KL.
    Returns:
      (rewards [B, M], kl [B, M]) float32, 0 on masked entries. A row with no real token gets
      no score.
    """
    _check_shapes("shaped_rewards", mask, logps=logps, ref_logps=ref_logps)
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape != jnp.shape(mask)[:1]:
        raise ValueError(
            f"ppo.shaped_rewards: scores has shape {scores.shape}, expected [B] = "
            f"{jnp.shape(mask)[:1]} (one per row of mask)"
        )
    m = jnp.asarray(mask) > 0
    kl = per_token_kl(jnp.where(m, logps, 0.0), jnp.where(m, ref_logps, 0.0), kind)
    kl = jnp.where(m, kl, 0.0)
    rewards = -jnp.asarray(kl_coef, jnp.float32) * kl
    rewards = rewards + jnp.where(last_token_onehot(m), scores[:, None], 0.0)
    return jnp.where(m, rewards, 0.0), kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438), per token.

    `delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t`,
    `A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}`, returns `R_t = A_t + V_t`:
    V and A past the last real token are 0 (the episode ends there; no bootstrap from
    padding). A reverse `lax.scan` over M; jit-able, gamma and lam may be traced.

    Args:
      rewards: [B, M] per-token rewards (e.g. `shaped_rewards`, optionally `whiten`ed).
      values: [B, M] value-head predictions V_t of the state before token t is sampled.
      mask: [B, M] real generated tokens.
      gamma, lam: discount and GAE lambda in [0, 1].
    Returns:
      (advantages [B, M], returns [B, M]) float32, 0 on masked entries (unwhitened).
    """
    _check_shapes("gae", mask, rewards=rewards, values=values)
    m = jnp.asarray(mask) > 0
    r = jnp.where(m, jnp.asarray(rewards, jnp.float32), 0.0)
    v = jnp.where(m, jnp.asarray(values, jnp.float32), 0.0)
    mf = m.astype(jnp.float32)
    shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # x_{t+1}, 0 past the end
    next_v, next_m = shift(v), shift(mf)
    gamma, lam = _f32(gamma, lam)
    delta = r + gamma * next_v * next_m - v

    def step(next_adv, xs):
        delta_t, next_m_t, m_t = xs
        adv = jnp.where(m_t, delta_t + gamma * lam * next_m_t * next_adv, 0.0)
        return adv, adv

    # Scan over time: [M, B] slices, last token first.
    _, adv = jax.lax.scan(
        step, jnp.zeros(r.shape[:1], jnp.float32), (delta.T, next_m.T, m.T), reverse=True
    )
    adv = adv.T
    return adv, jnp.where(m, adv + v, 0.0)


# ----------------------------------------------------------------------------------------
# Losses


def clipped_policy_loss(logps, old_logps, advantages, mask, clip_range):
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, Eq. 7), per token.

    `ratio = exp(logp - logp_old)`,
    `loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`, eps =
    `clip_range` (TRL `cliprange`, default 0.2). Gradients flow through `logps` only.

    Args:
      logps: [B, M] sampled-token log-probs under the current policy.
      old_logps: [B, M] the same under the policy that sampled the rollout.
      advantages: [B, M] (usually whitened GAE advantages).
      mask: [B, M] real generated tokens.
    Returns:
      (loss [], stats) with gradient-free stats: `clipfrac` (share of tokens where the
      clipped term is the larger), `approx_kl` (`0.5 * masked_mean((logp - logp_old)^2)`,
      TRL's approxkl), `ratio` (masked mean of the ratio).
    """
    _check_shapes("clipped_policy_loss", mask, logps=logps, old_logps=old_logps,
                  advantages=advantages)  # fmt: skip
    _positive("clipped_policy_loss", "clip_range", clip_range)
    m = jnp.asarray(mask) > 0
    logps = jnp.where(m, jnp.asarray(logps, jnp.float32), 0.0)
    old = jax.lax.stop_gradient(jnp.where(m, jnp.asarray(old_logps, jnp.float32), 0.0))
    adv = jax.lax.stop_gradient(jnp.where(m, jnp.asarray(advantages, jnp.float32), 0.0))
    diff = logps - old
    ratio = jnp.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(jnp.maximum(unclipped, clipped), m)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), m),
        "approx_kl": 0.5 * masked_mean(diff**2, m),
        "ratio": masked_mean(ratio, m),
    }
    return loss, jax.lax.stop_gradient(stats)


def clipped_value_loss(values, old_values, returns, mask, clip_range_value):
    """Clipped value loss (as in OpenAI baselines' PPO2 and TRL), per token.

    `V_clip = clip(V, V_old - c, V_old + c)`,
    `loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))`, c = `clip_range_value`
    (TRL `cliprange_value`, default 0.2). Gradients flow through `values` only.

    Args:
      values: [B, M] current value predictions.
      old_values: [B, M] the value predictions made at rollout time.
      returns: [B, M] GAE returns (`gae(...)[1]`).
      mask: [B, M] real generated tokens.
    Returns:
      (loss [], stats) with `vf_clipfrac`: share of tokens where the clipped error is larger.
    """
    _check_shapes("clipped_value_loss", mask, values=values, old_values=old_values,
                  returns=returns)  # fmt: skip
    _positive("clipped_value_loss", "clip_range_value", clip_range_value)
    m = jnp.asarray(mask) > 0
    v = jnp.where(m, jnp.asarray(values, jnp.float32), 0.0)
    old = jax.lax.stop_gradient(jnp.where(m, jnp.asarray(old_values, jnp.float32), 0.0))
    ret = jax.lax.stop_gradient(jnp.where(m, jnp.asarray(returns, jnp.float32), 0.0))
    unclipped = (v - ret) ** 2
    clipped = (jnp.clip(v, old - clip_range_value, old + clip_range_value) - ret) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), m)
    stats = {"vf_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), m)}
    return loss, jax.lax.stop_gradient(stats)


# ----------------------------------------------------------------------------------------
# KL controller


class KLControllerState(NamedTuple):
    """The KL coefficient beta_KL as training state (a pytree: checkpointed with the run).

    coef: [] float32, the current coefficient of `shaped_rewards`.
    """

    coef: jax.Array


def adaptive_kl_update(coef, current_kl, n_steps, target, horizon):
    """Ziegler et al. 2019 (arXiv 1909.08593, Sec. 2.2) adaptive KL coefficient; TRL's
    AdaptiveKLController.update.

    `e = clip(current_kl / target - 1, -0.2, 0.2)`, `coef' = coef * (1 + e * n_steps /
    horizon)`: beta_KL rises while the measured KL (per sequence, summed over tokens) is
    above the target and falls while below, by at most 20% per horizon of samples.
    `target=None` is the fixed controller: coef is returned unchanged. n_steps is the number
    of samples since the last update (TRL: the batch size).

    Works on Python floats (returns a float32 [] array) and on jnp arrays, traced or not.
    """
    if target is None:
        return coef
    _positive("adaptive_kl_update", "target", target)
    _positive("adaptive_kl_update", "horizon", horizon)
    coef, current_kl, n_steps, target, horizon = _f32(coef, current_kl, n_steps, target, horizon)
    error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)
