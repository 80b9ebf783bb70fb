"""dpo_jax.losses.ppo: hand-computed values, per-row Python loops, masks, and TRL's own code.

Expected values come from independent scalar loops in numpy (or are worked by hand in the
comments), never from the vectorised formula under test. TRL's PPO math ships in the 0.x
releases (`trl.core`, `trl.trainer.ppo_trainer.PPOTrainer`, `trl.trainer.utils`); TRL 1.x
(1.16 is pinned here) dropped it, so those parity tests skip with the missing name, and run
wherever an 0.x TRL is importable (checked with trl 0.11.4).
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_jax.losses import ppo


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


def left_mask(lengths, m):
    """[B, M] float32 with ones on tokens 0..len-1 of each row."""
    return (np.arange(m)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def random_rollout(seed, lengths, m):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    draw = lambda: rng.normal(size=(b, m)).astype(np.float32)
    return SimpleNamespace(
        mask=left_mask(lengths, m),
        logps=-np.abs(draw()) - 0.1,
        ref_logps=-np.abs(draw()) - 0.1,
        old_logps=-np.abs(draw()) - 0.1,
        rewards=draw(),
        values=draw(),
        old_values=draw(),
        returns=draw(),
        advantages=draw(),
        scores=rng.normal(size=b).astype(np.float32),
    )


def poison(x, mask, value=np.nan):
    """x with every masked entry replaced by `value`."""
    return np.where(np.asarray(mask) > 0, x, value).astype(np.float32)


# ---------------------------------------------------------------- per-token KL and rewards


def test_per_token_kl_hand_values():
    logps, ref = np.array([[-1.0, -2.0]]), np.array([[-1.5, -1.0]])  # d = [0.5, -1.0]
    close(ppo.per_token_kl(logps, ref), [[0.5, -1.0]])
    close(ppo.per_token_kl(logps, ref, "abs"), [[0.5, 1.0]])
    close(ppo.per_token_kl(logps, ref, "mse"), [[0.125, 0.5]])
    # k3 = exp(-d) - 1 + d
    close(ppo.per_token_kl(logps, ref, "k3"), [[math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]])
    with pytest.raises(ValueError, match="unknown kind 'full'"):
        ppo.per_token_kl(logps, ref, "full")


@pytest.mark.parametrize("kind", ["k1", "abs", "mse"])
def test_shaped_rewards_match_loop(kind):
    lengths, m, coef = [3, 5, 1, 0], 5, 0.15
    r = random_rollout(0, lengths, m)
    rewards, kl = ppo.shaped_rewards(r.scores, r.logps, r.ref_logps, r.mask, coef, kind)
    want_r, want_kl = np.zeros((4, m)), np.zeros((4, m))
    for b, n in enumerate(lengths):
        for t in range(n):
            d = float(r.logps[b, t]) - float(r.ref_logps[b, t])
            want_kl[b, t] = {"k1": d, "abs": abs(d), "mse": 0.5 * d * d}[kind]
            want_r[b, t] = -coef * want_kl[b, t] + (r.scores[b] if t == n - 1 else 0.0)
    close(rewards, want_r)
    close(kl, want_kl)


def test_shaped_rewards_ignore_masked_entries():
    lengths, m = [2, 4], 4
    r = random_rollout(1, lengths, m)
    want = ppo.shaped_rewards(r.scores, r.logps, r.ref_logps, r.mask, 0.1)
    got = ppo.shaped_rewards(
        r.scores, poison(r.logps, r.mask), poison(r.ref_logps, r.mask, np.inf), r.mask, 0.1
    )
    for a, b in zip(got, want, strict=True):
        assert np.all(np.isfinite(a))
        close(a, b, rtol=0, atol=0)
    # Hand: row 0 has 2 tokens, so the score lands at t = 1 and nothing after it.
    rewards, _ = got
    assert rewards[0, 1] == pytest.approx(
        -0.1 * (r.logps[0, 1] - r.ref_logps[0, 1]) + r.scores[0], rel=1e-6
    )
    assert np.all(np.asarray(rewards)[0, 2:] == 0)


def test_shaped_rewards_reject_bad_shapes():
    mask = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="scores has shape"):
        ppo.shaped_rewards(np.zeros(3), mask, mask, mask, 0.1)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        ppo.shaped_rewards(np.zeros(2), mask, mask[:, :2], mask, 0.1)


# ---------------------------------------------------------------- GAE


def test_gae_hand_values():
    # One row, 3 real tokens of M = 4, gamma = 0.9, lam = 0.8 (gamma * lam = 0.72):
    #   t=2: delta = 2 + 0 - 1.5 = 0.5                     A = 0.5
    #   t=1: delta = 0 + 0.9 * 1.5 - 1 = 0.35              A = 0.35 + 0.72 * 0.5 = 0.71
    #   t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4               A = 1.4 + 0.72 * 0.71 = 1.9112
    rewards = np.array([[1.0, 0.0, 2.0, 7.0]], np.float32)  # 7 and 9 sit in padding
    values = np.array([[0.5, 1.0, 1.5, 9.0]], np.float32)
    adv, ret = ppo.gae(rewards, values, left_mask([3], 4), 0.9, 0.8)
    close(adv, [[1.9112, 0.71, 0.5, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0, 0.0]])


def gae_loop(rewards, values, n, gamma, lam):
    """Textbook GAE for one episode of n steps that ends after step n - 1 (V_n = 0)."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(n)):
        next_value = float(values[t + 1]) if t + 1 < n else 0.0
        delta = float(rewards[t]) + gamma * next_value - float(values[t])
        last = delta + gamma * lam * last
        adv[t] = last
    ret = [adv[t] + float(values[t]) if t < n else 0.0 for t in range(len(rewards))]
    return adv, ret


GAE_B, GAE_M = 4, 7
jit_gae = jax.jit(ppo.gae)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, GAE_M), min_size=GAE_B, max_size=GAE_B),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gae_matches_per_row_loop(lengths, gamma, lam, seed):
    r = random_rollout(seed, lengths, GAE_M)
    # Garbage in the padding must not matter: the loop never reads it.
    rewards, values = poison(r.rewards, r.mask, 1e6), poison(r.values, r.mask, np.nan)
    adv, ret = jit_gae(rewards, values, r.mask, gamma, lam)
    for b, n in enumerate(lengths):
        want_adv, want_ret = gae_loop(r.rewards[b], r.values[b], n, gamma, lam)
        close(adv[b], want_adv, rtol=1e-5, atol=1e-5)
        close(ret[b], want_ret, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_gives_discounted_return_minus_value():
    # lam = 1: A_t = sum_k gamma^k r_{t+k} - V_t (Monte Carlo return), whatever V_{t+1}.
    r = random_rollout(3, [5, 2], 6)
    adv, ret = ppo.gae(r.rewards, r.values, r.mask, 0.95, 1.0)
    for b, n in enumerate([5, 2]):
        for t in range(n):
            mc = sum(0.95**k * float(r.rewards[b, t + k]) for k in range(n - t))
            assert adv[b, t] == pytest.approx(mc - r.values[b, t], abs=1e-5)
            assert ret[b, t] == pytest.approx(mc, abs=1e-5)


# ---------------------------------------------------------------- masked statistics


def test_masked_statistics_match_numpy_on_real_entries():
    r = random_rollout(4, [3, 6, 0, 2], 6)
    real = r.rewards[r.mask > 0].astype(np.float64)
    x = poison(r.rewards, r.mask)
    close(ppo.masked_mean(x, r.mask), real.mean())
    close(ppo.masked_var(x, r.mask), real.var(ddof=1))
    close(ppo.masked_var(x, r.mask, unbiased=False), real.var(ddof=0))
    w = np.asarray(ppo.whiten(x, r.mask))
    close(w[r.mask > 0], (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8), atol=1e-5)
    assert np.all(w[r.mask == 0] == 0)
    w = np.asarray(ppo.whiten(x, r.mask, shift_mean=False))
    close(w[r.mask > 0], (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8) + real.mean())
    close(ppo.masked_mean(x, r.mask, axis=1)[:2], [real[:3].mean(), real[3:9].mean()])


def test_masked_statistics_with_fewer_than_two_entries_are_zero():
    x = np.array([[3.0, np.nan]], np.float32)
    for mask in ([[0.0, 0.0]], [[1.0, 0.0]]):
        assert float(ppo.masked_var(x, np.array(mask))) == 0.0
        assert np.all(np.asarray(ppo.whiten(x, np.array(mask))) == 0.0)
    assert float(ppo.masked_mean(x, np.zeros((1, 2)))) == 0.0


# ---------------------------------------------------------------- clipped losses


def test_clipped_policy_loss_hand_values():
    # eps = 0.2, three real tokens and one padded (NaN) token:
    #   ratio 1.5, A = 1:  max(-1.5, -1.2) = -1.2 (clipped)
    #   ratio 0.5, A = -1: max(0.5, 0.8) = 0.8    (clipped)
    #   ratio 1.1, A = 2:  max(-2.2, -2.2) = -2.2 (not clipped: the terms are equal)
    old = np.array([[-1.0, -2.0, -0.5, np.nan]], np.float32)
    logps = old + np.log(np.array([[1.5, 0.5, 1.1, 1.0]], np.float32))
    adv = np.array([[1.0, -1.0, 2.0, np.nan]], np.float32)
    mask = left_mask([3], 4)
    loss, stats = ppo.clipped_policy_loss(logps, old, adv, mask, 0.2)
    close(loss, (-1.2 + 0.8 - 2.2) / 3)
    close(stats["clipfrac"], 2 / 3)
    close(stats["ratio"], (1.5 + 0.5 + 1.1) / 3)
    close(
        stats["approx_kl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    )
    # Only the unclipped token has a gradient: d/dlogp (-A * ratio) / 3 = -2.2 / 3.
    grad = jax.grad(lambda lp: ppo.clipped_policy_loss(lp, old, adv, mask, 0.2)[0])(logps)
    close(grad, [[0.0, 0.0, -2.2 / 3, 0.0]])


def test_clipped_policy_loss_matches_loop():
    lengths, eps = [4, 1, 6], 0.1
    r = random_rollout(5, lengths, 6)
    loss, stats = ppo.clipped_policy_loss(
        r.logps, poison(r.old_logps, r.mask), poison(r.advantages, r.mask), r.mask, eps
    )
    terms, clipped, ratios, sq = [], [], [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(float(r.logps[b, t]) - float(r.old_logps[b, t]))
            a = float(r.advantages[b, t])
            u, c = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(u, c))
            clipped.append(c > u)
            ratios.append(ratio)
            sq.append(math.log(ratio) ** 2)
    close(loss, np.mean(terms))
    close(stats["clipfrac"], np.mean(clipped))
    close(stats["ratio"], np.mean(ratios))
    close(stats["approx_kl"], 0.5 * np.mean(sq))


def test_clipped_value_loss_hand_values():
    # c = 0.2:
    #   V 1.0, old 0.5, R 2.0: V_clip 0.7, errors 1 and 1.69 -> 1.69 (clipped)
    #   V 2.0, old 2.0, R 1.0: V_clip 2.0, errors 1 and 1    -> 1    (not clipped)
    #   V 0.0, old 0.3, R 0.0: V_clip 0.1, errors 0 and 0.01 -> 0.01 (clipped)
    values = np.array([[1.0, 2.0, 0.0, np.nan]], np.float32)
    old = np.array([[0.5, 2.0, 0.3, np.inf]], np.float32)
    returns = np.array([[2.0, 1.0, 0.0, -np.inf]], np.float32)
    mask = left_mask([3], 4)
    loss, stats = ppo.clipped_value_loss(values, old, returns, mask, 0.2)
    close(loss, 0.5 * (1.69 + 1.0 + 0.01) / 3)
    close(stats["vf_clipfrac"], 2 / 3)
    # Gradient only where the unclipped error is the larger: token 1, 0.5 * 2 (V - R) / 3.
    grad = jax.grad(lambda v: ppo.clipped_value_loss(v, old, returns, mask, 0.2)[0])(values)
    close(grad, [[0.0, 1.0 / 3, 0.0, 0.0]])


def test_clipped_value_loss_matches_loop():
    lengths, c = [2, 5, 3], 0.3
    r = random_rollout(6, lengths, 5)
    loss, stats = ppo.clipped_value_loss(r.values, r.old_values, r.returns, r.mask, c)
    terms, clipped = [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            v, old, ret = (float(x[b, t]) for x in (r.values, r.old_values, r.returns))
            u, cl = (v - ret) ** 2, (min(max(v, old - c), old + c) - ret) ** 2
            terms.append(max(u, cl))
            clipped.append(cl > u)
    close(loss, 0.5 * np.mean(terms))
    close(stats["vf_clipfrac"], np.mean(clipped))


def test_losses_reject_bad_inputs():
    mask = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo.clipped_policy_loss(mask, mask, mask[:1], mask, 0.2)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ppo.clipped_policy_loss(mask, mask, mask, mask, 0.0)
    with pytest.raises(ValueError, match="clip_range_value must be > 0"):
        ppo.clipped_value_loss(mask, mask, mask, mask, -1.0)


# ---------------------------------------------------------------- KL controller


def test_adaptive_kl_update_hand_values():
    # KL 9 vs target 6: e = clip(0.5, -0.2, 0.2) = 0.2; coef 0.2 * (1 + 0.2 * 256 / 10000).
    assert float(ppo.adaptive_kl_update(0.2, 9.0, 256, 6.0, 10000)) == pytest.approx(0.201024)
    # KL 5.4 vs 6: e = -0.1; 0.2 * (1 - 0.1 * 512 / 10000) = 0.198976.
    assert float(ppo.adaptive_kl_update(0.2, 5.4, 512, 6.0, 10000)) == pytest.approx(0.198976)
    # KL 0 vs 6: e = -1 clipped to -0.2.
    assert float(ppo.adaptive_kl_update(0.2, 0.0, 10000, 6.0, 10000)) == pytest.approx(0.16)
    # Fixed controller: target None leaves the coefficient alone.
    assert ppo.adaptive_kl_update(0.2, 100.0, 256, None, 10000) == 0.2
    with pytest.raises(ValueError, match="target must be > 0"):
        ppo.adaptive_kl_update(0.2, 1.0, 1, 0.0, 10)


def test_adaptive_kl_update_is_jittable_and_matches_loop():
    kls, coef, n, target, horizon = [1.0, 7.5, 12.0, 6.0, 3.0], 0.1, 64, 6.0, 1000
    update = jax.jit(ppo.adaptive_kl_update)
    state = ppo.KLControllerState(jnp.asarray(coef, jnp.float32))
    want = coef
    for kl in kls:
        state = ppo.KLControllerState(update(state.coef, jnp.asarray(kl), n, target, horizon))
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        want *= 1.0 + error * n / horizon
    assert state.coef.shape == () and state.coef.dtype == jnp.float32
    assert float(state.coef) == pytest.approx(want, rel=1e-6)
    assert len(jax.tree.leaves(state)) == 1  # a pytree: checkpointed with the train state


# ---------------------------------------------------------------- TRL 0.x parity


def trl_attr(module, name):
    """`module.name` from the installed TRL, or a skip that names what is missing."""
    pytest.importorskip("torch")
    mod = pytest.importorskip(module, reason=f"{module} (TRL 0.x only) not importable")
    if not hasattr(mod, name):
        pytest.skip(f"{module}.{name} absent in the installed TRL (removed after 0.x)")
    return getattr(mod, name)


def torch64(*xs):
    import torch

    return [torch.tensor(np.asarray(x, np.float64)) for x in xs]


def test_masked_statistics_match_trl():
    masked_mean = trl_attr("trl.core", "masked_mean")
    masked_var, masked_whiten = (
        trl_attr("trl.core", "masked_var"),
        trl_attr("trl.core", "masked_whiten"),
    )
    r = random_rollout(7, [3, 6, 2], 6)
    x, mask = torch64(r.rewards, r.mask)
    real = r.mask > 0
    close(ppo.masked_mean(r.rewards, r.mask), masked_mean(x, mask).numpy())
    close(ppo.masked_var(r.rewards, r.mask), masked_var(x, mask).numpy())
    close(ppo.masked_var(r.rewards, r.mask, False), masked_var(x, mask, False).numpy())
    for shift in (True, False):
        want = masked_whiten(x, mask, shift_mean=shift).numpy()[real]
        close(np.asarray(ppo.whiten(r.rewards, r.mask, shift))[real], want, atol=1e-5)


def trl_ppo_trainer(**config):
    """An 0.x PPOTrainer with only the attributes its math methods read (no model, no data)."""
    trainer = object.__new__(trl_attr("trl.trainer.ppo_trainer", "PPOTrainer"))
    trainer.config = SimpleNamespace(**config)
    trainer.kl_ctl = SimpleNamespace(value=config.get("kl_coef", 0.0))
    return trainer


@pytest.mark.parametrize("kind,trl_kind", [("k1", "kl"), ("abs", "abs"), ("mse", "mse")])
def test_shaped_rewards_match_trl(kind, trl_kind):
    trainer = trl_ppo_trainer(kl_penalty=trl_kind, kl_coef=0.2)
    r = random_rollout(8, [4, 1, 6], 6)
    want_r, _, want_kl = trainer.compute_rewards(*torch64(r.scores, r.logps, r.ref_logps, r.mask))
    rewards, kl = ppo.shaped_rewards(r.scores, r.logps, r.ref_logps, r.mask, 0.2, kind)
    real = r.mask > 0
    close(np.asarray(rewards)[real], want_r.numpy()[real])
    close(np.asarray(kl)[real], want_kl.numpy()[real])


def test_gae_and_whitening_match_trl():
    trainer = trl_ppo_trainer(gamma=0.99, lam=0.95, whiten_rewards=False)
    r = random_rollout(9, [5, 2, 7, 3], 7)
    _, want_adv, want_ret = trainer.compute_advantages(*torch64(r.values, r.rewards, r.mask))
    adv, ret = ppo.gae(r.rewards, r.values, r.mask, 0.99, 0.95)
    real = r.mask > 0
    close(np.asarray(ppo.whiten(adv, r.mask))[real], want_adv.numpy()[real], atol=1e-5)
    close(np.asarray(ret)[real], want_ret.numpy()[real], atol=1e-5)


def test_clipped_losses_match_trl():
    import torch

    trainer = trl_ppo_trainer(cliprange=0.2, cliprange_value=0.2, vf_coef=1.0, ratio_threshold=1e9)
    r = random_rollout(10, [5, 2, 6], 6)
    logits = torch.zeros(3, 6, 4, dtype=torch.float64)
    old, values, vpreds, logps, mask, adv, ret = torch64(
        r.old_logps, r.old_values, r.values, r.logps, r.mask, r.advantages, r.returns
    )
    pg_loss, vf_loss, stats = trainer.loss(old, values, logits, vpreds, logps, mask, adv, ret)
    loss, pstats = ppo.clipped_policy_loss(r.logps, r.old_logps, r.advantages, r.mask, 0.2)
    vloss, vstats = ppo.clipped_value_loss(r.values, r.old_values, r.returns, r.mask, 0.2)
    close(loss, pg_loss.item())
    close(vloss, vf_loss.item())
    close(pstats["clipfrac"], stats["policy/clipfrac"].item())
    close(pstats["approx_kl"], stats["policy/approxkl"].item())
    close(vstats["vf_clipfrac"], stats["val/clipfrac"].item())


def test_adaptive_kl_update_matches_trl():
    controller = trl_attr("trl.trainer.utils", "AdaptiveKLController")(0.2, 6.0, 10000)
    coef = 0.2
    for kl, n in [(9.0, 256), (5.0, 256), (6.5, 128), (0.0, 512)]:
        controller.update(kl, n)
        coef = ppo.adaptive_kl_update(coef, kl, n, 6.0, 10000)
        assert float(coef) == pytest.approx(controller.value, rel=1e-6)
