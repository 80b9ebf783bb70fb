"""KV-cache decoding (`DecoderLM.decode`) equals the full forward, for every family/feature.

A batch of prompts of different lengths is left-padded, prefilled, extended by a 2-token
chunk and then one token at a time; the logits of every real position must equal those of
the training forward over the same (unpadded, right-aligned at 0) sequences.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import DecoderLM, KVCache, ModelConfig, init_cache

PROMPT_LENGTHS = (3, 7, 5)  # mixed lengths in one batch, left-padded to T = 7
T = max(PROMPT_LENGTHS)
NEW = 6  # tokens appended after the prefill: one chunk of 2, then 4 single steps
CONFIGS = {
    "llama_gqa": ModelConfig.tiny("llama"),
    "llama3_rope": ModelConfig.tiny("llama", rope_type="llama3", rope_original_max_positions=16),
    # Window 3 < prompt + new tokens (up to 13): the window is exceeded in prefill and decode.
    "mistral_window": ModelConfig.tiny("mistral", sliding_window=3),
    "qwen2_bias": ModelConfig.tiny("qwen2"),
    "gemma": ModelConfig.tiny("gemma"),
    "gpt2_learned": ModelConfig.tiny("gpt2", max_position_embeddings=16),
    "gpt_neox_partial_parallel": ModelConfig.tiny("gpt_neox"),
    "gpt_neox_remat": ModelConfig.tiny("gpt_neox", parallel_residual=False, remat=True),
}


def random_params(model, seed=0):
    """Random float32 params with the shapes of model.init (no compiled init); norm scales
    near 1 (as in test_models_decoder.py)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32)))

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def sequences(seed=0):
    """Per row: prompt (PROMPT_LENGTHS) followed by NEW continuation tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n + NEW).astype(np.int32) for n in PROMPT_LENGTHS]


def left_padded_prompts(seqs):
    tokens = np.zeros((len(seqs), T), np.int32)
    segment_ids = np.zeros((len(seqs), T), np.int32)
    positions = np.zeros((len(seqs), T), np.int32)
    for i, (seq, n) in enumerate(zip(seqs, PROMPT_LENGTHS, strict=True)):
        tokens[i, T - n :] = seq[:n]
        segment_ids[i, T - n :] = 1
        positions[i, T - n :] = np.arange(n)
    continuation = np.stack([seq[n:] for seq, n in zip(seqs, PROMPT_LENGTHS, strict=True)])
    return tokens, segment_ids, positions, continuation


@functools.partial(jax.jit, static_argnums=0)
def cached_logits(model, params, tokens, segment_ids, positions, continuation):
    """[B, T + NEW, V]: prefill, one 2-token chunk, then single tokens (lax.scan)."""
    cache = init_cache(model.config, tokens.shape[0], T + NEW)
    apply = functools.partial(model.apply, {"params": params}, method="decode")
    prefill, cache = apply(tokens, positions, cache, segment_ids)
    next_pos = positions[:, -1] + 1
    chunk, cache = apply(continuation[:, :2], next_pos[:, None] + jnp.arange(2), cache)

    def step(cache, i):
        tok = jax.lax.dynamic_slice_in_dim(continuation, i, 1, axis=1)
        logits, cache = apply(tok, (next_pos + i)[:, None], cache)
        return cache, logits[:, 0]

    cache, steps = jax.lax.scan(step, cache, jnp.arange(2, NEW))
    return jnp.concatenate([prefill, chunk, steps.transpose(1, 0, 2)], axis=1), cache


@functools.partial(jax.jit, static_argnums=0)
def full_logits(model, params, tokens, segment_ids):
    return model.apply({"params": params}, tokens, segment_ids=segment_ids)


def reference(model, params, seqs):
    """Full-forward logits of each sequence, right-padded (row starts at position 0)."""
    length = T + NEW
    tokens = np.zeros((len(seqs), length), np.int32)
    segment_ids = np.zeros((len(seqs), length), np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, : seq.size] = seq
        segment_ids[i, : seq.size] = 1
    return np.asarray(full_logits(model, params, tokens, segment_ids).astype(jnp.float32))


def compare(model, params, atol, seed=0):
    seqs = sequences(seed)
    tokens, segment_ids, positions, continuation = left_padded_prompts(seqs)
    got, cache = cached_logits(model, params, tokens, segment_ids, positions, continuation)
    got = np.asarray(got.astype(jnp.float32))
    want = reference(model, params, seqs)
    for i, n in enumerate(PROMPT_LENGTHS):
        # Row i's real tokens sit in columns T - n .. T + NEW - 1 of the cached run.
        np.testing.assert_allclose(got[i, T - n :], want[i, : n + NEW], atol=atol, rtol=0)
    assert int(cache.index) == T + NEW
    return got


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_full_forward(name):
    model = DecoderLM(CONFIGS[name])
    compare(model, random_params(model), atol=1e-5)


def test_sliding_window_is_exceeded_and_matters():
    """The windowed model's logits differ from the same weights without a window, so the
    equality above checks the window in the cache mask rather than passing by luck."""
    windowed = DecoderLM(CONFIGS["mistral_window"])
    params = random_params(windowed)
    got = compare(windowed, params, atol=1e-5)
    unwindowed = DecoderLM(CONFIGS["mistral_window"].replace(sliding_window=None))
    plain = compare(unwindowed, params, atol=1e-5)
    # Row 1 (prompt of 7) at its last position sees 12 earlier tokens, 3 with the window.
    assert np.abs(got[1, -1] - plain[1, -1]).max() > 1e-2
    # Within the window (first 3 positions of row 1) both agree.
    np.testing.assert_allclose(got[1, :3], plain[1, :3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt_neox_partial_parallel"])
def test_bfloat16_decoding(name):
    """bfloat16 compute with a bfloat16 cache: equal to the bfloat16 full forward within
    bfloat16 rounding, and close to float32."""
    config = CONFIGS[name].replace(dtype="bfloat16")
    model = DecoderLM(config)
    params = random_params(model)
    seqs = sequences()
    tokens, segment_ids, positions, continuation = left_padded_prompts(seqs)
    got, cache = cached_logits(model, params, tokens, segment_ids, positions, continuation)
    assert got.dtype == jnp.bfloat16 and cache.k[0].dtype == jnp.bfloat16
    compare(model, params, atol=0.02)
    want32 = reference(DecoderLM(CONFIGS[name]), params, seqs)
    got = np.asarray(got.astype(jnp.float32))
    err = max(
        np.abs(got[i, T - n :] - want32[i, : n + NEW]).max() for i, n in enumerate(PROMPT_LENGTHS)
    )
    assert err < 0.1, err


def test_last_only_prefill_and_cache_shapes():
    config = CONFIGS["llama_gqa"]
    model = DecoderLM(config)
    params = random_params(model)
    tokens, segment_ids, positions, _ = left_padded_prompts(sequences())
    cache = init_cache(config, 3, 10)
    assert isinstance(cache, KVCache) and cache.max_length == 10
    assert cache.k[0].shape == (3, 10, config.num_kv_heads, config.head_dim)
    full, _ = model.apply(
        {"params": params}, tokens, positions, cache, segment_ids, method="decode"
    )
    last, cache = model.apply(
        {"params": params}, tokens, positions, cache, segment_ids, method="decode", last_only=True
    )
    assert last.shape == (3, 1, config.vocab_size) and int(cache.index) == T
    np.testing.assert_array_equal(last[:, 0], full[:, -1])
    np.testing.assert_array_equal(cache.segment_ids[:, :T], segment_ids)


def test_decode_errors():
    config = CONFIGS["llama_gqa"]
    model = DecoderLM(config)
    params = random_params(model)
    tokens = jnp.ones((2, 6), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    with pytest.raises(ValueError, match="6 tokens exceed the cache's 4 slots"):
        model.apply(
            {"params": params}, tokens, positions, init_cache(config, 2, 4), method="decode"
        )
    with pytest.raises(ValueError, match="does not fit"):
        model.apply(
            {"params": params}, tokens, positions, init_cache(config, 3, 8), method="decode"
        )
