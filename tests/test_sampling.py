"""dpo_jax.sampling: every sampled token and log-prob checked against a teacher-forced full
forward; determinism, seeds, stopping, num_samples, mesh and pmap placements, bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dpo_jax import parallel
from dpo_jax.models import DecoderLM, ModelConfig
from dpo_jax.sampling import Samples, sample

PROMPTS = [[5, 17, 3], [9, 200, 41, 77, 12, 8, 150], [33], [250, 1, 2, 3, 4]]
M = 6  # max_new_tokens
SAMPLING = dict(temperature=0.7, top_k=40, top_p=0.9)


def random_params(model, seed=0, scale=0.3):
    """Random float32 params (no compiled init). A large scale gives peaked next-token
    distributions, so that top-k / top-p cut off real probability mass."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32)))

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1 + 0.1 * noise if path[-1].key == "scale" else scale * noise

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def llama():
    model = DecoderLM(ModelConfig.tiny("llama"))
    return model, random_params(model)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(model, params, tokens, segment_ids):
    return model.apply({"params": params}, tokens, segment_ids=segment_ids).astype(jnp.float32)


def teacher_forced_logits(model, params, prompts, out: Samples, num_samples=1, new_tokens=M):
    """Per row, full-forward logits [M, V] that predicted each generated token (rows past the
    row's length are junk). One compiled forward for all rows (right padding)."""
    length = max(map(len, prompts)) + new_tokens
    rows = [p for p in prompts for _ in range(num_samples)]
    tokens = np.zeros((len(rows), length), np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    for r, prompt in enumerate(rows):
        seq = np.r_[prompt, out.tokens[r, : out.lengths[r]]]
        tokens[r, : seq.size] = seq
        segment_ids[r, : seq.size] = 1
    logits = np.asarray(_full_logits(model, params, tokens, segment_ids))
    return np.stack([logits[r, len(p) - 1 : len(p) - 1 + new_tokens] for r, p in enumerate(rows)])


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sampling_distribution(logits, temperature, top_k, top_p):
    """Independent numpy version of the warpers (Hugging Face semantics): log-probs [.., V]."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(x, axis=-1)[..., -top_k][..., None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1:
        probs = np.exp(log_softmax(x))
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_probs, -1) - sorted_probs
        keep_sorted = before < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        x = np.where(keep, x, -np.inf)
    return log_softmax(x)


def check_tail(out: Samples, pad_id=0):
    for r, n in enumerate(out.lengths):
        assert (out.tokens[r, n:] == pad_id).all()
        assert (out.logps[r, n:] == 0).all() and (out.model_logps[r, n:] == 0).all()


# ------------------------------------------------------------------------------------------
# Greedy and sampled tokens against the full forward
# ------------------------------------------------------------------------------------------


def test_greedy_is_argmax_of_the_full_forward(llama):
    model, params = llama
    out = sample(model, params, PROMPTS, rng=0, max_new_tokens=M, temperature=0.0)
    assert out.tokens.shape == (4, M) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.lengths, M)
    logits = teacher_forced_logits(model, params, PROMPTS, out)
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    picked = np.take_along_axis(log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.model_logps, picked, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.logps, 0.0)  # a point mass
    # Deterministic, whatever the seed.
    again = sample(model, params, PROMPTS, rng=123, max_new_tokens=M, temperature=0.0)
    np.testing.assert_array_equal(again.tokens, out.tokens)


def test_sampled_logps_equal_teacher_forced(llama):
    model, params = llama
    out = sample(model, params, PROMPTS, rng=1, max_new_tokens=M, num_samples=2, **SAMPLING)
    assert out.tokens.shape == (8, M)
    logits = teacher_forced_logits(model, params, PROMPTS, out, num_samples=2)
    model_logps = np.take_along_axis(log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    dist = sampling_distribution(logits, **SAMPLING)
    logps = np.take_along_axis(dist, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.model_logps, model_logps, atol=1e-5, rtol=0)
    # The sampling distribution divides the logits by T = 0.7, which scales their float32
    # rounding (decode vs full forward) by 1/T: 1e-5 relative, as every float32 parity here
    # (measured: 1.2e-5 absolute at a log-prob of -2.8 on one processor, under 1e-5 on another).
    np.testing.assert_allclose(out.logps, logps, atol=1e-5, rtol=1e-5)
    # Truncation really removed mass (else the distributions would only differ by 1/T).
    kept = np.isfinite(dist).sum(-1)
    assert kept.min() < 40 and (kept < 256).all()
    assert np.isfinite(out.logps).all()


def test_seeds(llama):
    model, params = llama
    a = sample(model, params, PROMPTS, rng=7, max_new_tokens=M, temperature=1.0)
    b = sample(model, params, PROMPTS, rng=jax.random.key(7), max_new_tokens=M, temperature=1.0)
    c = sample(model, params, PROMPTS, rng=8, max_new_tokens=M, temperature=1.0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logps, b.logps)
    assert (a.tokens != c.tokens).mean() > 0.5
    # Temperature 1, no truncation: the sampling distribution is the model's.
    np.testing.assert_allclose(a.logps, a.model_logps, atol=1e-6, rtol=0)


def test_no_key_reuse_across_steps_or_rows(llama):
    """All-zero params give uniform next-token distributions at every step, so a key
    reused across steps would repeat a row's token, and one reused across rows would give
    every row the same tokens."""
    model, params = llama
    zeros = jax.tree.map(np.zeros_like, params)
    out = sample(model, zeros, PROMPTS, rng=0, max_new_tokens=M, temperature=1.0)
    assert all(len(set(row)) > 1 for row in out.tokens)
    assert len({tuple(row) for row in out.tokens}) == len(PROMPTS)
    np.testing.assert_allclose(out.model_logps, -np.log(256), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# Stopping
# ------------------------------------------------------------------------------------------


def test_eos_stops_rows(llama):
    model, params = llama
    free = sample(model, params, PROMPTS, rng=0, max_new_tokens=M, temperature=0.0)
    eos = int(free.tokens[1, 2])  # row 1 emits it at step 2; other rows maybe never
    out = sample(model, params, PROMPTS, rng=0, max_new_tokens=M, temperature=0.0, eos_id=[eos])
    for r in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[r] == eos)
        n = hits[0] + 1 if hits.size else M
        assert out.lengths[r] == n
        np.testing.assert_array_equal(out.tokens[r, :n], free.tokens[r, :n])
        np.testing.assert_array_equal(out.model_logps[r, :n], free.model_logps[r, :n])
    assert out.lengths[1] == 3
    check_tail(out)


def test_all_rows_stop_early_and_pad_id(llama):
    model, params = llama
    free = sample(model, params, PROMPTS, rng=0, max_new_tokens=M, temperature=0.0)
    eos = sorted({int(t) for t in free.tokens[:, 0]})  # every row stops at step 0
    out = sample(
        model, params, PROMPTS, rng=0, max_new_tokens=M, temperature=0.0, eos_id=eos, pad_id=-1
    )
    np.testing.assert_array_equal(out.lengths, 1)
    np.testing.assert_array_equal(out.tokens[:, 0], free.tokens[:, 0])
    check_tail(out, pad_id=-1)


def test_stop_sequences(llama):
    model, params = llama
    free = sample(model, params, PROMPTS, rng=0, max_new_tokens=M, temperature=0.0)
    stop = [int(free.tokens[0, 1]), int(free.tokens[0, 2])]  # row 0 stops after step 2
    never = [int(free.tokens[2, 0])] * M  # longer than any match in the outputs
    out = sample(
        model, params, PROMPTS, rng=0, max_new_tokens=M, temperature=0.0,
        stop_sequences=[stop, never],
    )  # fmt: skip
    for r in range(len(PROMPTS)):
        ends = [t + 1 for t in range(1, M) if list(free.tokens[r, t - 1 : t + 1]) == stop]
        assert out.lengths[r] == (ends[0] if ends else M)
    assert out.lengths[0] <= 3
    check_tail(out)


# ------------------------------------------------------------------------------------------
# num_samples, mesh and pmap: the same samples however the rows are produced or placed
# ------------------------------------------------------------------------------------------


def test_num_samples_equals_sampling_each_copy(llama):
    model, params = llama
    many = sample(model, params, PROMPTS, rng=3, max_new_tokens=M, num_samples=3, **SAMPLING)
    copies = [p for p in PROMPTS for _ in range(3)]
    each = sample(model, params, copies, rng=3, max_new_tokens=M, **SAMPLING)
    np.testing.assert_array_equal(many.tokens, each.tokens)
    np.testing.assert_array_equal(many.lengths, each.lengths)
    # Log-probs of a few units divided by T = 0.7: float32 rounding of a different batch
    # size's matmuls is relative, hence rtol.
    np.testing.assert_allclose(many.logps, each.logps, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(many.model_logps, each.model_logps, atol=1e-5, rtol=1e-5)
    # The copies of one prompt are different samples.
    assert len({tuple(t) for t in many.tokens[:3]}) > 1


@pytest.fixture(scope="module")
def one_device(llama):
    model, params = llama
    return sample(model, params, PROMPTS, rng=5, max_new_tokens=M, num_samples=2, **SAMPLING)


def assert_same(a: Samples, b: Samples):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.logps, b.logps, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a.model_logps, b.model_logps, atol=1e-5, rtol=1e-5)


def test_sharded_mesh_equals_one_device(llama, one_device):
    """Rows over data x fsdp (4 prompts padded to the 4 batch shards), params FSDP +
    tensor parallel by the training rules, on 8 fake devices."""
    model, params = llama
    mesh = parallel.make_mesh((2, 2, 2))
    placed = parallel.put_sharded(params, sampling_param_shardings(model, mesh))
    out = sample(
        model, placed, PROMPTS, rng=5, max_new_tokens=M, num_samples=2, mesh=mesh,
        rules=parallel.DEFAULT_RULES, **SAMPLING,
    )  # fmt: skip
    assert_same(out, one_device)
    # Three prompts on 4 batch shards: padded internally, cut from the result.
    out3 = sample(
        model, params, PROMPTS[:3], rng=5, max_new_tokens=M, num_samples=2, mesh=mesh,
        **SAMPLING,
    )  # fmt: skip
    assert_same(out3, Samples(*(x[:6] for x in one_device)))


def test_tensor_parallel_with_fewer_kv_heads_than_shards():
    """Gemma's single kv head on a tensor axis of 4: the cache's kv-head dim cannot be split
    (it follows the unsplit k/v kernels) while the query heads are; same samples."""
    model = DecoderLM(ModelConfig.tiny("gemma"))
    params = random_params(model, scale=0.1)
    kwargs = dict(rng=2, max_new_tokens=4, temperature=1.0, num_samples=2)
    want = sample(model, params, PROMPTS[:2], **kwargs)
    mesh = parallel.make_mesh((2, 1, 4))
    placed = parallel.put_sharded(params, sampling_param_shardings(model, mesh))
    assert placed["layers_0"]["attn"]["q_kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert_same(sample(model, placed, PROMPTS[:2], mesh=mesh, **kwargs), want)


def sampling_param_shardings(model, mesh):
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    specs = parallel.param_logical_specs(boxed)
    return parallel.state_shardings(
        parallel.unbox(boxed), mesh, parallel.DEFAULT_RULES, param_specs=specs
    )


def test_pmap_equals_jit(llama, one_device):
    model, params = llama
    out = sample(
        model, parallel.replicate(params), PROMPTS, rng=5, max_new_tokens=M, num_samples=2,
        pmap=True, **SAMPLING,
    )  # fmt: skip
    assert_same(out, one_device)
    with pytest.raises(ValueError, match="params must be replicated over the 8 local devices"):
        sample(model, params, PROMPTS, rng=5, max_new_tokens=M, pmap=True)


# ------------------------------------------------------------------------------------------
# Other families and bad input
# ------------------------------------------------------------------------------------------


def test_gpt2_learned_positions_and_context():
    """Learned positions: prompts padded to a multiple of 8 (16) would not fit the table of
    13, so the padding is capped; generating past the table is an error."""
    model = DecoderLM(ModelConfig.tiny("gpt2", max_position_embeddings=13))
    params = random_params(model, scale=0.1)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4]]
    out = sample(model, params, prompts, rng=0, max_new_tokens=4, temperature=0.0)
    logits = teacher_forced_logits(model, params, prompts, out, new_tokens=4)
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    assert np.isfinite(out.model_logps).all()
    with pytest.raises(ValueError, match=r"prompts\[0\] \(9 tokens\) \+ max_new_tokens=6"):
        sample(model, params, prompts, rng=0, max_new_tokens=6, temperature=0.0)
    with pytest.raises(ValueError, match=r"prompts\[1\] has 14 tokens, longer than .* 13"):
        sample(model, params, [[1], [2] * 14], rng=0, max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty"),
        (dict(prompts=[[1, 2], [3, 256]]), r"prompts\[1\] has token ids outside"),
        (dict(prompts=[[1] * 129]), r"prompts\[0\] has 129 tokens, longer than"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
        (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
        (dict(temperature=float("nan")), "temperature=nan must be >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be an integer >= 1"),
        (dict(num_samples=0), "num_samples=0 must be an integer >= 1"),
        (dict(eos_id=256), "eos_id 256 outside the vocabulary"),
        (dict(stop_sequences=[[]]), r"stop_sequences\[0\] has length 0"),
        (dict(mesh="m", pmap=True), "either mesh= .* or pmap=True"),
    ],
)
def test_bad_input(llama, kwargs, message):
    model, params = llama
    args = dict(prompts=PROMPTS, rng=0, max_new_tokens=M) | kwargs
    with pytest.raises(ValueError, match=message):
        sample(model, params, args.pop("prompts"), **args)
