"""KL(policy || reference): teacher-forced log-probs and the Monte-Carlo estimate, checked
against exact enumeration on a vocabulary of 4 and completions of 3 tokens."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, models
from dpo_jax.evaluation import kl

VOCAB, LENGTH, PROMPT = 4, 3, [1]


def _tiny(seed: int):
    # A wide init makes the next-token distributions far from uniform and far from each
    # other, so the exact KL is large enough for the test to tell a wrong estimate apart.
    cfg = models.ModelConfig.tiny(
        vocab_size=VOCAB, hidden_size=16, num_heads=2, head_dim=8, mlp_dim=32,
        num_kv_heads=1, initializer_range=1.0,
    )  # fmt: skip
    model = models.DecoderLM(cfg)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


@pytest.fixture(scope="module")
def policy_and_reference():
    return _tiny(0), _tiny(1)


ALL = [list(c) for c in itertools.product(range(VOCAB), repeat=LENGTH)]


def test_completion_logps_is_a_distribution_over_all_sequences(policy_and_reference):
    (model, params), _ = policy_and_reference
    lp = kl.completion_logps(model, params, [PROMPT] * len(ALL), ALL, batch_size=24)
    assert lp.shape == (VOCAB**LENGTH,)
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, atol=1e-5)
    # Equals the plain forward + logprobs on the unpadded sequences.
    tokens = jnp.asarray([PROMPT + c for c in ALL])
    logits = model.apply({"params": params}, tokens)
    want = logprobs.token_logps(logits, tokens)[:, 1:].sum(-1)
    np.testing.assert_allclose(lp, want, atol=1e-5)


def test_left_padding_gets_unpadded_positions(policy_and_reference):
    (model, params), _ = policy_and_reference
    prompts = [[1, 2, 3], [2]]
    completions = [[0, 1], [3, 3, 1]]
    want = kl.completion_logps(model, params, prompts, completions)
    # Left-padded layout (as a sampler with a shared prompt end writes it): 0 = padding.
    tokens = np.array([[0, 1, 2, 3, 0, 1, 0], [0, 0, 0, 2, 3, 3, 1]])
    segment_ids = np.array([[0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]])
    loss_mask = np.array([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]])
    got = kl.sequence_logps(model, params, tokens, loss_mask, segment_ids=segment_ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    efficient = kl.sequence_logps(
        model, params, tokens, loss_mask, segment_ids=segment_ids, memory_efficient=True
    )
    np.testing.assert_allclose(efficient, want, rtol=1e-5, atol=1e-5)


def test_kl_is_zero_for_the_reference_itself(policy_and_reference):
    (model, params), _ = policy_and_reference
    rng = np.random.default_rng(0)
    completions = rng.integers(0, VOCAB, size=(50, LENGTH)).tolist()
    lp = kl.completion_logps(model, params, [PROMPT] * 50, completions)
    ref = kl.completion_logps(model, params, [PROMPT] * 50, completions)
    est = kl.sequence_kl(lp, ref)
    assert est.mean == 0.0 and est.stderr == 0.0 and est.num_samples == 50


def test_monte_carlo_kl_matches_exact_enumeration(policy_and_reference):
    (model, params), (ref_model, ref_params) = policy_and_reference
    prompts = [PROMPT] * len(ALL)
    lp_all = kl.completion_logps(model, params, prompts, ALL)
    lr_all = kl.completion_logps(ref_model, ref_params, prompts, ALL)
    p = np.exp(lp_all)
    exact = float((p * (lp_all - lr_all)).sum())
    assert exact > 0.2  # far from 0: a biased estimator (e.g. wrong sign or tokens) fails

    n = 4000
    picks = np.random.default_rng(1).choice(len(ALL), size=n, p=p / p.sum())
    samples = [ALL[i] for i in picks]
    est = kl.sequence_kl(
        kl.completion_logps(model, params, [PROMPT] * n, samples, batch_size=500),
        kl.completion_logps(ref_model, ref_params, [PROMPT] * n, samples, batch_size=500),
    )
    assert 0 < est.stderr < 0.1 * exact
    assert abs(est.mean - exact) < 3 * est.stderr, (est.mean, est.stderr, exact)
    # Samples of the reference (the wrong distribution) estimate -KL(ref || pi), not this.
    wrong = np.random.default_rng(2).choice(
        len(ALL), size=n, p=np.exp(lr_all) / np.exp(lr_all).sum()
    )
    wrong_est = kl.sequence_kl(lp_all[wrong], lr_all[wrong])
    assert abs(wrong_est.mean - exact) > 3 * est.stderr


def test_sampler_samples_give_the_exact_kl(policy_and_reference):
    """The real path: samples and their log-probs from `dpo_jax.sampling`, reference
    log-probs by teacher forcing; the estimate matches the enumerated KL."""
    from dpo_jax import sampling

    (model, params), (ref_model, ref_params) = policy_and_reference
    prompts = [PROMPT] * len(ALL)
    lp_all = kl.completion_logps(model, params, prompts, ALL)
    lr_all = kl.completion_logps(ref_model, ref_params, prompts, ALL)
    exact = float((np.exp(lp_all) * (lp_all - lr_all)).sum())
    n = 3000
    out = sampling.sample(
        model, params, [PROMPT], rng=0, max_new_tokens=LENGTH, temperature=1.0, num_samples=n
    )
    assert (out.lengths == LENGTH).all()  # no EOS: every sample is a full 3-token sequence
    completions = out.tokens.tolist()
    est = kl.sequence_kl(
        out.logps.sum(-1),
        kl.completion_logps(ref_model, ref_params, [PROMPT] * n, completions, batch_size=1000),
    )
    assert abs(est.mean - exact) < 3 * est.stderr, (est.mean, est.stderr, exact)
    # The sampler's log-probs are the teacher-forced ones of the policy (at T = 1).
    own = kl.completion_logps(model, params, [PROMPT] * n, completions, batch_size=1000)
    np.testing.assert_allclose(out.logps.sum(-1), own, rtol=1e-5, atol=1e-5)


def test_padding_stays_inside_a_learned_position_table():
    cfg = models.ModelConfig.tiny("gpt2", vocab_size=VOCAB, max_position_embeddings=6)
    model = models.DecoderLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    # 5 tokens, rounded up to 8 > 6 positions: padded to 6 instead.
    got = kl.completion_logps(model, params, [[1]], [[0, 2, 3, 1]], pad_to_multiple_of=4)
    tokens = jnp.asarray([[1, 0, 2, 3, 1]])
    want = logprobs.token_logps(model.apply({"params": params}, tokens), tokens)[:, 1:].sum()
    np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_bad_inputs(policy_and_reference):
    (model, params), _ = policy_and_reference
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        kl.completion_logps(model, params, [[1], [1]], [[2]])
    with pytest.raises(ValueError, match="sequence 1 has an empty completion"):
        kl.completion_logps(model, params, [[1], [1]], [[2], []])
    with pytest.raises(ValueError, match="sequence 0 has an empty prompt"):
        kl.completion_logps(model, params, [[]], [[2]])
    with pytest.raises(ValueError, match="empty list"):
        kl.completion_logps(model, params, [], [])
    with pytest.raises(ValueError, match="no samples"):
        kl.sequence_kl([], [])
    with pytest.raises(ValueError, match="one shape"):
        kl.sequence_kl([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"ref_logps\[1\] = -inf is not finite"):
        kl.sequence_kl([-1.0, -2.0], [-1.0, -np.inf])
    one = kl.sequence_kl([-1.0], [-2.0])
    assert one.mean == 1.0 and np.isnan(one.stderr)
