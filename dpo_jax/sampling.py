"""KV-cache autoregressive sampling from a `DecoderLM`: greedy, temperature, top-k, top-p.

    out = sample(model, params, prompts, rng=0, max_new_tokens=64, temperature=0.7,
                 top_p=0.9, eos_id=2, num_samples=4)
    out.tokens [R, M], out.lengths [R], out.logps [R, M], out.model_logps [R, M]

R = len(prompts) * num_samples rows, prompt-major (row i * num_samples + j is sample j of
prompt i), M = max_new_tokens. Axis letters: B prompts, R rows, T prompt length (after left
padding), M new tokens, S cache slots (T + M - 1), V vocab.

How it runs: prompts are left-padded into one [B, T] batch (padding is segment 0, positions
count real tokens only, so every row sees exactly what it would see alone); one prefill over
the prompts fills the KV cache, which is then repeated num_samples times; a `lax.while_loop`
decodes one token per step for all rows until every row has stopped (EOS, a stop sequence,
or M tokens). Everything from the prefill to the last token is one jitted program.

Randomness: row r draws step t's token with `fold_in(fold_in(rng, r), t)`, so no key is
reused, results do not depend on how rows are split over devices, and a prompt's samples do
not depend on the other prompts in the batch.

Log-probs (float32): `logps` under the distribution actually sampled from (logits / T, then
top-k, then top-p, renormalised; 0 for greedy, a point mass), `model_logps` under the
unmodified model (temperature 1, no truncation), e.g. for KL(policy || reference) with the
reference's teacher-forced log-probs. Both are 0 after a row's length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dpo_jax import parallel
from dpo_jax.models.decoder import DecoderLM, KVCache, init_cache


class Samples(NamedTuple):
    """Output of `sample`. R = number of prompts * num_samples, M = max_new_tokens.

    tokens: [R, M] int32 generated tokens (not the prompt); pad_id after `lengths`.
    lengths: [R] int32 generated tokens per row, including the EOS / stop sequence that ended
      it (M when it never stopped).
    logps: [R, M] float32 log-prob of each token under the sampling distribution.
    model_logps: [R, M] float32 log-prob of each token under the unmodified model.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logps: np.ndarray
    model_logps: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that changes the compiled program (temperature and top_p do not)."""

    greedy: bool
    top_k: int
    use_top_p: bool
    max_new_tokens: int
    num_samples: int
    eos_ids: tuple[int, ...]
    stop_sequences: tuple[tuple[int, ...], ...]
    pad_id: int


# ------------------------------------------------------------------------------------------
# Token choice
# ------------------------------------------------------------------------------------------


def sampling_logits(
    logits: jax.Array, temperature: jax.Array | float, top_k: int, top_p: jax.Array | float
) -> jax.Array:
    """Float32 logits [..., V] of the sampling distribution: logits / temperature, then
    top-k (keep values >= the k-th largest; 0 = off), then top-p (keep the most probable
    tokens until their mass reaches top_p; 1 = off). Removed tokens get -inf. Ties at a
    threshold are all kept, as in Hugging Face's TopK/TopP warpers."""
    x = logits.astype(jnp.float32) / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    # A static top_p of 1 skips the sort (and float32 cumsum rounding cutting the tail).
    if not (isinstance(top_p, int | float) and top_p >= 1.0):
        ordered = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The most probable token is always kept (mass_before = 0 < top_p).
        keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return x


def _choose(logits, keys, temperature, top_p, static: _Static):
    """Next token [R], its sampling log-prob [R] and model log-prob [R] from logits [R, V]."""
    logits = logits.astype(jnp.float32)
    model_logps = jax.nn.log_softmax(logits, axis=-1)
    if static.greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jnp.zeros(token.shape, jnp.float32)
    else:
        top_p = top_p if static.use_top_p else 1.0
        x = sampling_logits(logits, temperature, static.top_k, top_p)
        token = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), token[:, None], -1)[:, 0]
    model_logp = jnp.take_along_axis(model_logps, token[:, None], -1)[:, 0]
    return token, logp, model_logp


def _stopped(tokens, t, static: _Static):
    """[R] bool: the tokens written so far (columns 0..t of tokens [R, M]) end a row."""
    last = tokens[:, t]
    done = jnp.zeros(last.shape, bool)
    for eos in static.eos_ids:
        done |= last == eos
    for seq in static.stop_sequences:
        m = len(seq)
        # dynamic_slice clamps a negative start; the t + 1 >= m test discards that case.
        window = jax.lax.dynamic_slice_in_dim(tokens, t - m + 1, m, axis=1)
        done |= jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1) & (t + 1 >= m)
    return done


# ------------------------------------------------------------------------------------------
# The traced sampler
# ------------------------------------------------------------------------------------------


def _generate(params, tokens, segment_ids, prompt_ids, rng, temperature, top_p, *, model, static):
    """tokens, segment_ids: [B, T] left-padded prompts; prompt_ids [B] int32 global prompt
    index (row keys); rng a key; temperature, top_p [] float32. Returns Samples of jax
    arrays with R = B * num_samples rows."""
    cfg = model.config
    n, M = static.num_samples, static.max_new_tokens
    B, T = tokens.shape
    R = B * n
    positions = jnp.maximum(jnp.cumsum(segment_ids > 0, axis=1) - 1, 0).astype(jnp.int32)
    cache = init_cache(cfg, B, T + M - 1)
    logits, cache = model.apply(
        {"params": params}, tokens, positions, cache, segment_ids, method="decode", last_only=True
    )

    # The prompt's prefill runs once; its cache and last logits serve all n samples.
    def repeat(x):
        return jnp.repeat(x, n, axis=0)

    cache = KVCache(
        tuple(map(repeat, cache.k)),
        tuple(map(repeat, cache.v)),
        repeat(cache.positions),
        repeat(cache.segment_ids),
        cache.index,
    )
    next_position = repeat(positions[:, -1] + 1)
    row_ids = (prompt_ids[:, None] * n + jnp.arange(n, dtype=jnp.int32)).reshape(R)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(row_ids)

    def step_keys(t):
        return jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)

    def record(carry, t, logits):
        out, done, lengths = carry
        token, logp, model_logp = _choose(logits[:, -1], step_keys(t), temperature, top_p, static)
        token = jnp.where(done, static.pad_id, token)
        columns = (token, jnp.where(done, 0.0, logp), jnp.where(done, 0.0, model_logp))
        out = tuple(o.at[:, t].set(c) for o, c in zip(out, columns, strict=True))
        stop = ~done & _stopped(out[0], t, static)
        return out, done | stop, jnp.where(stop, t + 1, lengths)

    empty = (
        jnp.full((R, M), static.pad_id, jnp.int32),
        jnp.zeros((R, M), jnp.float32),
        jnp.zeros((R, M), jnp.float32),
    )
    carry = (empty, jnp.zeros((R,), bool), jnp.full((R,), M, jnp.int32))
    carry = record(carry, 0, repeat(logits))

    def cond(state):
        t, _, (_, done, _) = state
        return (t < M) & ~jnp.all(done)

    def body(state):
        t, cache, carry = state
        # Stopped rows hold pad_id, which need not be a valid id (e.g. -1): feed token 0 to
        # them instead, so that they compute finite junk rather than NaNs.
        last = jnp.where(carry[1], 0, carry[0][0][:, t - 1])
        logits, cache = model.apply(
            {"params": params},
            last[:, None],
            (next_position + t - 1)[:, None],
            cache,
            method="decode",
        )
        return t + 1, cache, record(carry, t, logits)

    _, _, ((out_tokens, logps, model_logps), _, lengths) = jax.lax.while_loop(
        cond, body, (jnp.asarray(1, jnp.int32), cache, carry)
    )
    return Samples(out_tokens, lengths, logps, model_logps)


@functools.lru_cache(maxsize=64)
def _compiled(model: DecoderLM, static: _Static, mesh: Mesh | None, rules, use_pmap: bool):
    """The jitted (or pmapped) `_generate`; one per model config and static options."""
    generate = functools.partial(_generate, model=model, static=static)
    if use_pmap:
        return jax.pmap(generate, in_axes=(0, 0, 0, 0, None, None, None))
    if mesh is None:
        return jax.jit(generate)

    def with_rules(*args):
        with nn.logical_axis_rules(rules):
            return generate(*args)

    return jax.jit(with_rules)


# ------------------------------------------------------------------------------------------
# The public entry point
# ------------------------------------------------------------------------------------------


def _check_options(max_new_tokens, temperature, top_k, top_p, num_samples, eos_id, stops, vocab):
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"sample: temperature={temperature!r} must be >= 0 (0 = greedy)")
    if not isinstance(top_k, int | np.integer) or top_k < 0:
        raise ValueError(f"sample: top_k={top_k!r} must be an integer >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p={top_p!r} must be in (0, 1] (1 = off)")
    if not isinstance(num_samples, int | np.integer) or num_samples < 1:
        raise ValueError(f"sample: num_samples={num_samples!r} must be an integer >= 1")
    eos_ids = () if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    for e in eos_ids:
        if not 0 <= e < vocab:
            raise ValueError(f"sample: eos_id {e} outside the vocabulary [0, {vocab})")
    stop_sequences = tuple(tuple(int(x) for x in seq) for seq in stops)
    for i, seq in enumerate(stop_sequences):
        if not seq or len(seq) > max_new_tokens:
            raise ValueError(
                f"sample: stop_sequences[{i}] has length {len(seq)}; it must be between 1 "
                f"and max_new_tokens={max_new_tokens}"
            )
    return eos_ids, stop_sequences


def _pad_prompts(prompts, config, max_new_tokens, multiple):
    """Left-padded tokens and segment ids [B', T] (B' = len(prompts) rounded up to
    `multiple` with copies of prompt 0), after checking every prompt."""
    if isinstance(prompts, np.ndarray | jax.Array) and np.ndim(prompts) != 2:
        raise ValueError(f"sample: prompts array must be [B, T], got shape {np.shape(prompts)}")
    if len(prompts) == 0:
        raise ValueError("sample: prompts is empty; pass at least one prompt")
    rows = []
    context = config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        row = np.asarray(prompt)
        if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"sample: prompts[{i}] must be a non-empty sequence of token ids, got "
                f"shape {row.shape} dtype {row.dtype}"
            )
        if row.min() < 0 or row.max() >= config.vocab_size:
            raise ValueError(
                f"sample: prompts[{i}] has token ids outside the vocabulary "
                f"[0, {config.vocab_size}): min {row.min()}, max {row.max()}"
            )
        if row.size > context:
            raise ValueError(
                f"sample: prompts[{i}] has {row.size} tokens, longer than the model's context "
                f"of {context} (max_position_embeddings)"
            )
        if config.position == "learned" and row.size + max_new_tokens - 1 > context:
            # Positions past the learned table have no embedding (they would read NaNs).
            raise ValueError(
                f"sample: prompts[{i}] ({row.size} tokens) + max_new_tokens={max_new_tokens} "
                f"exceeds the learned position table of {context} positions"
            )
        rows.append(row.astype(np.int32))
    # Lengths rounded up to a multiple of 8 (extra left padding is masked), so that prompt
    # sets of similar lengths share one compiled program.
    # (capped at the context, which DecoderLM checks against the padded length).
    longest = max(r.size for r in rows)
    length = max(longest, min(-(-longest // 8) * 8, context))
    rows += [rows[0]] * (-len(rows) % multiple)
    tokens = np.zeros((len(rows), length), np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - row.size :] = row
        segment_ids[i, length - row.size :] = 1
    return tokens, segment_ids


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def sample(
    model: DecoderLM,
    params: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    rng: jax.Array | int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    num_samples: int = 1,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
    pmap: bool = False,
) -> Samples:
    """Samples `num_samples` completions of each prompt; returns host `Samples`.

    model, params: a DecoderLM and its (unboxed) params; see the three placements below.
    prompts: B token-id sequences of any lengths >= 1 (no padding), or a [B, T] array of
      unpadded prompts of equal length.
    rng: a PRNG key or an int seed. Same rng and inputs -> the same samples.
    max_new_tokens: M. temperature: 0 = greedy (argmax), else logits / temperature.
    top_k: keep the k most probable tokens (0 = off). top_p: nucleus mass in (0, 1] (1 = off).
    eos_id: one or several ids that end a row (included in its tokens and length).
    stop_sequences: token sequences that end a row when its generated tokens end with one
      (included in its tokens and length; the prompt is not searched).
    pad_id: fills `tokens` after a row has stopped.
    Placement:
      default: one device (`jax.jit`).
      mesh (+ rules): one program over the mesh, as in training: rows split over the data
        axes, params placed by the logical-axis rules (already-placed params are not
        copied); the number of prompts is padded to a multiple of the batch shards.
      pmap=True: data parallel over the local devices; params replicated with a leading
        device axis (`parallel.replicate`, as the pmap train state holds them).
    Returns Samples with R = B * num_samples rows, prompt-major.
    """
    config = model.config
    eos_ids, stops = _check_options(
        max_new_tokens, temperature, top_k, top_p, num_samples, eos_id, stop_sequences,
        config.vocab_size,
    )  # fmt: skip
    static = _Static(
        greedy=temperature == 0,
        top_k=int(top_k),
        use_top_p=top_p < 1.0,
        max_new_tokens=int(max_new_tokens),
        num_samples=int(num_samples),
        eos_ids=eos_ids,
        stop_sequences=stops,
        pad_id=int(pad_id),
    )
    if pmap and mesh is not None:
        raise ValueError("sample: pass either mesh= (jit on a mesh) or pmap=True, not both")
    if pmap:
        shards = jax.local_device_count()
    elif mesh is not None:
        shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
    else:
        shards = 1
    num_prompts = len(prompts)
    tokens, segment_ids = _pad_prompts(prompts, config, max_new_tokens, shards)
    prompt_ids = np.arange(tokens.shape[0], dtype=np.int32)
    key = jax.random.key(rng) if isinstance(rng, int | np.integer) else rng
    scalars = (key, jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p))
    rules = parallel.check_rules(rules, mesh) if mesh is not None else None
    generate = _compiled(model, static, mesh, rules, pmap)
    if pmap:
        _check_replicated(model, params)
        batch = parallel.shard_batch_pmap((tokens, segment_ids, prompt_ids))
        out = generate(params, *batch, *scalars)
        out = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), out)
    elif mesh is not None:
        out = _run_on_mesh(generate, model, params, (tokens, segment_ids, prompt_ids), scalars,
                           mesh, rules)  # fmt: skip
    else:
        out = generate(params, tokens, segment_ids, prompt_ids, *scalars)
    out = jax.tree.map(_to_host, out)
    return Samples(*(x[: num_prompts * num_samples] for x in out))


def _run_on_mesh(generate, model, params, batch, scalars, mesh, rules):
    shardings = _param_shardings(model, mesh, rules)
    params = jax.device_put(parallel.unbox(params), shardings)
    row_sharding = parallel.batch_sharding(mesh)
    # Every process holds all prompts; each device takes its rows.
    batch = tuple(
        jax.make_array_from_callback(x.shape, row_sharding, lambda idx, x=x: x[idx]) for x in batch
    )
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalars = jax.device_put(scalars, replicated)
    with jax.set_mesh(mesh):
        return generate(params, *batch, *scalars)


def _check_replicated(model: DecoderLM, params):
    n = jax.local_device_count()
    want = parallel.unbox(_abstract_params(model))
    got = parallel.unbox(params)
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise ValueError("sample: params do not have the structure of the model's params")
    leaves = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True)
    for (path, x), w in leaves:
        if np.shape(x) != (n, *w.shape):
            raise ValueError(
                f"sample(pmap=True): params must be replicated over the {n} local devices "
                f"(parallel.replicate): {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(x)}, expected {(n, *w.shape)}"
            )


@functools.lru_cache(maxsize=16)
def _abstract_params(model: DecoderLM):
    """Boxed (logically named) abstract params of `model`; allocates nothing."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


@functools.lru_cache(maxsize=16)
def _param_shardings(model: DecoderLM, mesh: Mesh, rules):
    boxed = _abstract_params(model)
    specs = parallel.param_logical_specs(boxed)
    return parallel.state_shardings(parallel.unbox(boxed), mesh, rules, param_specs=specs)
