"""Log-probs of target tokens: per token, per sequence, per preference pair.

Alignment convention (shared by data, logprobs and train): entry t of a token log-prob
array is log p(tokens[t] | tokens[<t]), computed from the logits at position t-1; entry 0
is 0. `loss_mask[..., t] = 1` marks token t as scored (a response token). With packing a
segment's first token is never scored, so the shift across segment borders is harmless.

All log-softmax math runs in float32 whatever the compute dtype.

Two ways to get token log-probs:
  * `token_logps(logits, tokens)` from full logits [B, L, V];
  * `token_logps_from_features(hidden, unembed, tokens)` from the final hidden states and
    the unembedding matrix. It loops over chunks of the sequence and blocks of the
    vocabulary and has a custom VJP that recomputes each block's softmax, so neither the
    forward nor the backward pass holds [B, L, V] in memory. With V = 128k this is most of
    the activation memory of a DPO step (see experiments/logprobs_memory/README.md).
    Given `loss_mask`, it runs the head only at the positions whose next token is scored
    (response tokens): each row's scored positions are gathered to its front (or dealt
    evenly over groups of rows) and the chunks past the fullest row's count are skipped,
    forward and backward (DPO's sums never read the other entries, which it returns as 0).

Targets outside [0, V) give NaN at their entry (never a silently wrong number); at
unscored entries the masked helpers below drop it without touching values or gradients.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "token_logps",
    "token_logps_from_features",
    "masked_sum",
    "masked_mean",
    "token_counts",
    "pair_sums",
]


def _shift_right(x):
    """[..., L-1] -> [..., L]: prepend a 0 so that entry t belongs to token t."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)])


def _check_tokens(tokens, shape, fn, other):
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise TypeError(f"logprobs.{fn}: tokens must be integers, got {jnp.result_type(tokens)}")
    if tuple(tokens.shape) != tuple(shape):
        raise ValueError(
            f"logprobs.{fn}: tokens shape {tuple(tokens.shape)} does not match {other} "
            f"(expected {tuple(shape)})"
        )


def token_logps(logits, tokens):
    """Per-token log-probs from full logits.

    Args:
      logits: [B, L, V] any float dtype (leading dims may be any batch shape).
      tokens: [B, L] int.
    Returns:
      [B, L] float32; entry t = log_softmax(logits[:, t-1])[tokens[:, t]], entry 0 = 0.
    """
    if logits.ndim < 2:
        raise ValueError(f"logprobs.token_logps: logits must be [..., L, V], got {logits.shape}")
    _check_tokens(tokens, logits.shape[:-1], "token_logps", f"logits {tuple(logits.shape)}")
    vocab_size = logits.shape[-1]
    logits = logits[..., :-1, :].astype(jnp.float32)
    targets = tokens[..., 1:]
    valid = (targets >= 0) & (targets < vocab_size)
    safe_targets = jnp.clip(targets, 0, vocab_size - 1)[..., None]
    picked = jnp.take_along_axis(logits, safe_targets, axis=-1)[..., 0]
    logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return _shift_right(jnp.where(valid, logps, jnp.nan))


# ----------------------------------------------------------------------------------------
# Memory-efficient path: chunked over the sequence (lax.map / scan) and over the vocabulary
# (online logsumexp), with a custom VJP that recomputes softmax chunk by chunk (or, with
# keep_logits, reads the forward's float32 logits of each chunk back).
# Internal layout: h [C, B, c, D] (C chunks of c positions), targets [C, B, c], w [D, V],
# vocab blocks of vc columns.
# ----------------------------------------------------------------------------------------


def _vocab_block(w, j, vc):
    """Vocab block j of w [D, V] -> (w_j [D, vc], start, cols [vc], new [vc] bool).

    Block j covers columns [j*vc, (j+1)*vc). When vc does not divide V the last block is
    shifted left to end at V (so w is never padded, i.e. never copied) and `new` marks the
    columns that an earlier block has not covered already.
    """
    vocab_size = w.shape[1]
    if vc == vocab_size:
        return w, 0, jnp.arange(vc), jnp.ones((vc,), bool)
    start = jnp.minimum(j * vc, vocab_size - vc)
    cols = start + jnp.arange(vc)
    return lax.dynamic_slice_in_dim(w, start, vc, axis=1), start, cols, cols >= j * vc


def _block_logits(h, w_j, new):
    """h [B, c, D], w_j [D, vc] -> logits [B, c, vc] float32, -inf on columns seen before."""
    logits = jnp.einsum("bcd,dv->bcv", h, w_j, preferred_element_type=jnp.float32)
    return jnp.where(new, logits, -jnp.inf)


def _num_blocks(w, vc):
    return -(-w.shape[1] // vc)


def _chunk_forward(h, targets, w, vc):
    """One sequence chunk: h [B, c, D], targets [B, c] -> (logps [B, c], lse [B, c])."""

    def block(carry, j):
        running_max, sum_exp, picked = carry
        w_j, _, cols, new = _vocab_block(w, j, vc)
        logits = _block_logits(h, w_j, new)
        new_max = jnp.maximum(running_max, logits.max(-1))
        sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.exp(
            logits - new_max[..., None]
        ).sum(-1)
        is_target = (cols == targets[..., None]) & new
        picked = picked + jnp.where(is_target, logits, 0.0).sum(-1)
        return (new_max, sum_exp, picked), None

    zeros = jnp.zeros(targets.shape, jnp.float32)
    init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), zeros, zeros)
    (running_max, sum_exp, picked), _ = lax.scan(block, init, jnp.arange(_num_blocks(w, vc)))
    lse = running_max + jnp.log(sum_exp)
    valid = (targets >= 0) & (targets < w.shape[1])
    return jnp.where(valid, picked - lse, jnp.nan), lse


def _if_live(live, k, compute, skipped):
    """compute() for sequence chunk k if it is live (k < live; None = every chunk is), else
    skipped(): a chunk holding no scored position costs no head FLOPs."""
    if live is None:
        return compute()
    return lax.cond(k < live, compute, skipped)


def _chunk_forward_kept(h, targets, w):
    """One sequence chunk over the whole vocabulary at once: (logps [B, c], lse [B, c],
    logits [B, c, V] float32), the logits kept for the backward pass."""
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = (targets >= 0) & (targets < w.shape[1])
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(valid, picked - lse, jnp.nan), lse, logits


def _chunked_logps_fwd(h, w, targets, live, vc, keep_logits):
    def chunk(xs):
        k, h_c, targets_c = xs
        zeros = jnp.zeros(targets_c.shape, jnp.float32)
        if keep_logits:
            no_logits = jnp.zeros((*targets_c.shape, w.shape[1]), jnp.float32)
            return _if_live(
                live,
                k,
                lambda: _chunk_forward_kept(h_c, targets_c, w),
                lambda: (zeros, zeros, no_logits),
            )
        return _if_live(
            live, k, lambda: _chunk_forward(h_c, targets_c, w, vc), lambda: (zeros, zeros)
        )

    out = lax.map(chunk, (jnp.arange(h.shape[0]), h, targets))
    logps, lse, logits = out if keep_logits else (*out, None)
    return logps, (h, w, targets, live, lse, logits)


def _chunked_logps_bwd(vc, keep_logits, residuals, g):
    h, w, targets, live, lse, logits = residuals
    compute_dtype = jnp.result_type(h, w)
    # Invalid targets gave a constant NaN: no gradient flows from them.
    g = jnp.where((targets >= 0) & (targets < w.shape[1]), g, 0.0).astype(jnp.float32)
    if keep_logits:
        return _kept_logits_bwd(h, w, targets, live, lse, logits, g, compute_dtype)

    # Vocab blocks outside, sequence chunks inside: each block's d unembed is accumulated in
    # float32 at [D, vc] only, then written once into a [D, V] buffer of w's dtype.
    def block(carry, j):
        dh, dw = carry
        w_j, start, cols, new = _vocab_block(w, j, vc)

        def chunk(dw_j, xs):
            k, h_c, targets_c, lse_c, g_c = xs
            return _if_live(
                live,
                k,
                lambda: chunk_grads(dw_j, h_c, targets_c, lse_c, g_c),
                lambda: (dw_j, jnp.zeros(h_c.shape, jnp.float32)),
            )

        def chunk_grads(dw_j, h_c, targets_c, lse_c, g_c):
            # d logp / d logits = onehot(target) - softmax, recomputed from the saved lse;
            # both are 0 on columns of an earlier block (logits -inf there).
            probs = jnp.exp(_block_logits(h_c, w_j, new) - lse_c[..., None])
            onehot = ((cols == targets_c[..., None]) & new).astype(jnp.float32)
            # As autodiff of a matmul in the compute dtype: cotangent cast, f32 accumulation.
            dlogits = (g_c[..., None] * (onehot - probs)).astype(compute_dtype)
            dh_c = jnp.einsum("bcv,dv->bcd", dlogits, w_j, preferred_element_type=jnp.float32)
            dw_j = dw_j + jnp.einsum(
                "bcd,bcv->dv", h_c, dlogits, preferred_element_type=jnp.float32
            )
            return dw_j, dh_c

        xs = (jnp.arange(h.shape[0]), h, targets, lse, g)
        dw_j, dh_j = lax.scan(chunk, jnp.zeros(w_j.shape, jnp.float32), xs)
        if w_j.shape == w.shape:
            return (dh + dh_j, dw_j.astype(w.dtype)), None
        dw_j = jnp.where(new, dw_j.astype(w.dtype), lax.dynamic_slice_in_dim(dw, start, vc, 1))
        return (dh + dh_j, lax.dynamic_update_slice_in_dim(dw, dw_j, start, axis=1)), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
    (dh, dw), _ = lax.scan(block, init, jnp.arange(_num_blocks(w, vc)))
    return dh.astype(h.dtype), dw, None, None


def _kept_logits_bwd(h, w, targets, live, lse, logits, g, compute_dtype):
    """The backward pass from the kept logits [C, B, c, V]: no head matmul is recomputed."""
    cols = jnp.arange(w.shape[1])

    def chunk(dw, xs):
        k, h_c, targets_c, lse_c, g_c, logits_c = xs

        def grads():
            probs = jnp.exp(logits_c - lse_c[..., None])
            onehot = (cols == targets_c[..., None]).astype(jnp.float32)
            dlogits = (g_c[..., None] * (onehot - probs)).astype(compute_dtype)
            dh_c = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32)
            return dw + jnp.einsum(
                "bcd,bcv->dv", h_c, dlogits, preferred_element_type=jnp.float32
            ), dh_c

        return _if_live(live, k, grads, lambda: (dw, jnp.zeros(h_c.shape, jnp.float32)))

    xs = (jnp.arange(h.shape[0]), h, targets, lse, g, logits)
    dw, dh = lax.scan(chunk, jnp.zeros(w.shape, jnp.float32), xs)
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None


# vc (vocab chunk) is a static Python int and keep_logits a static bool, hence nondiff
# arguments. live: None (every chunk) or an int32 scalar, the number of leading chunks to
# compute (the rest give 0).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_logps(h, w, targets, live, vc, keep_logits=False):
    return _chunked_logps_fwd(h, w, targets, live, vc, keep_logits)[0]


_chunked_logps.defvjp(_chunked_logps_fwd, _chunked_logps_bwd)


def _deal_scored(scored, groups, slots):
    """Where the head's inputs come from: each group's scored positions, dealt evenly over
    the group's rows (round robin), before any other position.

    Args:
      scored: [R, n] bool, position t predicts a scored token.
      groups: G, dividing R: G contiguous groups of r = R / G rows (G = R: every row keeps
        its own positions, so nothing crosses a batch sharding).
      slots: head positions per row (>= n).
    Returns:
      order: [G, r n] a permutation of each group's flattened positions, scored first (in
        order): entry j of group g goes to its row j % r, slot j // r.
      dealt: [G, r slots] the position (index into the group's r n) of each row's slots,
        row-major; the slots past r n entries take position 0, which nothing reads.
      most: int32 scalar, the most scored positions any row holds after dealing.
    """
    rows, n = scored.shape
    r = rows // groups
    flat = scored.reshape(groups, r * n)
    order = jnp.argsort((~flat).astype(jnp.int32), axis=-1, stable=True)  # stable: in order
    padded = jnp.pad(order, ((0, 0), (0, r * (slots - n))))
    dealt = padded.reshape(groups, slots, r).swapaxes(1, 2).reshape(groups, r * slots)
    most = -(-flat.sum(-1).max() // r)
    return order, dealt, most


def token_logps_from_features(
    hidden,
    unembed,
    tokens,
    *,
    loss_mask=None,
    row_groups=None,
    chunk_size=256,
    vocab_chunk_size=8192,
    keep_logits=False,
):
    """Per-token log-probs from final hidden states, without materialising [B, L, V].

    Equals `token_logps(hidden @ unembed, tokens)` (the matmul accumulated in float32,
    logsumexp in float32) and has the same gradients w.r.t. hidden and unembed. Live memory
    is a few float32 [B, chunk_size, vocab_chunk_size] blocks, a float32 [B, L, D] hidden
    gradient and the [D, V] unembed gradient (in unembed's dtype), instead of several
    float32 [B, L, V] arrays. Compute: the logits are computed twice (once more in the
    backward pass), like rematerialisation, unless `keep_logits`.

    With `loss_mask`, the head runs only where it is needed: each row's scored entries are
    gathered to its front (in order; positions t-1 for the entries t with loss_mask = 1),
    and the sequence chunks past the row with the most scored entries are skipped, forward
    and backward (`lax.cond`, decided at run time). So the head's cost follows the largest
    per-row count of scored tokens rounded up to `chunk_size`, not L: nothing is
    truncated, whatever the batch holds (no capacity to choose, no token ever dropped),
    and the shapes stay static. Scored entries (and all gradients) equal the unmasked
    call's; unscored entries are 0. `row_groups` evens the rows out: the scored positions
    of each of that many groups of rows are dealt round robin over the group's rows, so the
    cost follows the group's mean count, not its longest row's; positions then move across
    rows, so under a batch-sharded jit keep each group within a shard (row_groups = the
    number of batch shards, or None: every row alone, the default).

    Args:
      hidden: [B, L, D] float (leading dims may be any batch shape), e.g. bfloat16.
      unembed: [D, V] float.
      tokens: [B, L] int.
      loss_mask: optional [B, L] 0/1, `loss_mask[..., t] = 1` when entry t is scored.
      row_groups: with loss_mask, G dividing the rows (the product of the leading dims): the
        scored positions are balanced within G contiguous groups of rows; None = G = rows.
      chunk_size: sequence positions per chunk; L need not be a multiple (padded inside).
        With `loss_mask` it is also the granularity at which chunks are skipped.
      vocab_chunk_size: vocabulary columns per block (online logsumexp over blocks); need
        not divide V. None = whole vocabulary at once, which keeps a float32 [D, V]
        gradient accumulator (and, if unembed is sharded over vocab, avoids slicing it).
      keep_logits: under differentiation, keep every chunk's float32 logits [c, V] (the
        whole vocabulary at once; vocab_chunk_size is ignored) for the backward pass instead
        of recomputing them: one head matmul fewer (of the forward's one and the backward's
        three) for float32 [chunks x rows x chunk_size, V] of memory, e.g. 0.4 GB for
        3,072 positions of a 32,000-token vocabulary. Worth it where the head is a large
        share of the step and memory is not short (issue 12's CPU benchmark).
    Returns:
      [B, L] float32, same alignment as `token_logps` (entry 0 = 0); with `loss_mask`, 0
      wherever loss_mask = 0.
    """
    fn = "token_logps_from_features"
    if hidden.ndim < 2 or unembed.ndim != 2 or hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"logprobs.{fn}: need hidden [..., L, D] and unembed [D, V], got hidden "
            f"{tuple(hidden.shape)} and unembed {tuple(unembed.shape)}"
        )
    _check_tokens(tokens, hidden.shape[:-1], fn, f"hidden {tuple(hidden.shape)}")
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"logprobs.{fn}: loss_mask shape {tuple(loss_mask.shape)} does not match tokens "
            f"{tuple(tokens.shape)}"
        )
    sizes = ("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)
    for name, value in (*sizes, ("row_groups", row_groups)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"logprobs.{fn}: {name} must be a positive int, got {value!r}")
    *batch_shape, length, width = hidden.shape
    if row_groups is not None and math.prod(batch_shape) % row_groups:
        raise ValueError(
            f"logprobs.{fn}: row_groups={row_groups} must divide the {math.prod(batch_shape)} "
            f"rows of hidden {tuple(hidden.shape)}"
        )
    vocab_size = unembed.shape[1]
    if length < 2:  # nothing to score: entry 0 is 0 by convention
        return jnp.zeros(tokens.shape, jnp.float32)

    rows = math.prod(batch_shape)
    n = length - 1  # positions 0..L-2 predict tokens 1..L-1
    c = min(chunk_size, n)
    num_chunks = -(-n // c)
    pad = num_chunks * c - n
    h = hidden.reshape(rows, length, width)[:, :-1]
    targets = tokens.reshape(rows, length)[:, 1:]
    live = None
    if loss_mask is None:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    else:
        groups = rows if row_groups is None else row_groups
        scored = loss_mask.reshape(rows, length)[:, 1:] != 0  # [B, L-1]: predicts a scored one
        order, dealt, most = _deal_scored(scored, groups, num_chunks * c)
        h = jnp.take_along_axis(h.reshape(groups, -1, width), dealt[..., None], axis=1)
        targets = jnp.take_along_axis(targets.reshape(groups, -1), dealt, axis=1)
        live = -(-most // c)  # leading chunks holding a scored position
    # Chunk axis first, rows kept inside each chunk so a batch sharding survives the loop.
    h = h.reshape(rows, num_chunks, c, width).swapaxes(0, 1)
    targets = targets.reshape(rows, num_chunks, c).swapaxes(0, 1)

    vc = vocab_size if vocab_chunk_size is None or keep_logits else vocab_chunk_size
    keep = bool(keep_logits)
    logps = _chunked_logps(h, unembed, targets, live, min(vc, vocab_size), keep)  # [C, rows, c]
    logps = logps.swapaxes(0, 1).reshape(rows, num_chunks * c)
    if loss_mask is None:
        logps = logps[:, :n]
    else:  # back to sequence order; unscored entries are 0
        dealt_order = logps.reshape(groups, -1, num_chunks * c).swapaxes(1, 2)
        listed = dealt_order.reshape(groups, -1)[:, : order.shape[1]]
        logps = jnp.zeros(order.shape, jnp.float32)
        logps = logps.at[jnp.arange(groups)[:, None], order].set(listed, unique_indices=True)
        logps = jnp.where(scored, logps.reshape(rows, n), 0.0)
    return _shift_right(logps).reshape(tokens.shape)


# ----------------------------------------------------------------------------------------
# Masked reductions. Masks are 0/1 (any dtype); entries where mask == 0 are dropped with
# `where`, so a NaN or inf there never reaches the result or its gradient.
# ----------------------------------------------------------------------------------------


def _check_same_shape(values, mask, fn):
    if tuple(values.shape) != tuple(mask.shape):
        raise ValueError(
            f"logprobs.{fn}: values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}"
        )


def masked_sum(values, mask):
    """Per-sequence sum of scored entries: values, mask [B, L] -> [B] float32.

    With token log-probs this is the sequence log-prob, e.g. `chosen_logps`.
    """
    _check_same_shape(values, mask, "masked_sum")
    return jnp.where(mask != 0, values.astype(jnp.float32), 0.0).sum(-1)


def token_counts(mask):
    """Number of scored tokens per sequence: mask [B, L] -> [B] float32."""
    return (mask != 0).sum(-1).astype(jnp.float32)


def masked_mean(values, mask):
    """Per-sequence mean over scored entries: [B, L] -> [B] float32 (0 where none scored)."""
    _check_same_shape(values, mask, "masked_mean")
    return masked_sum(values, mask) / jnp.maximum(token_counts(mask), 1.0)


def pair_sums(values, slot_ids, num_pairs, mask=None):
    """Sums a packed batch's values into preference-pair slots.

    Args:
      values: [R, L] (e.g. token log-probs of a packed batch).
      slot_ids: [R, L] int, 2 * pair + side (side 0 = chosen, 1 = rejected), -1 = ignore.
      num_pairs: static int B, the batch's pair capacity.
      mask: optional [R, L] 0/1 (e.g. loss_mask); 0 entries are dropped.
    Returns:
      [B, 2] float32: [:, 0] chosen sums, [:, 1] rejected sums. `pair_sums(loss_mask,
      slot_ids, B)` gives the scored-token counts. Slot ids >= 2 * B are dropped.
    """
    _check_same_shape(values, slot_ids, "pair_sums")
    keep = slot_ids >= 0
    if mask is not None:
        _check_same_shape(values, mask, "pair_sums")
        keep = keep & (mask != 0)
    values = jnp.where(keep, values.astype(jnp.float32), 0.0)
    num_slots = 2 * num_pairs
    # Ignored entries go to an out-of-range slot, which segment_sum drops.
    slots = jnp.where(keep, slot_ids, num_slots)
    sums = jax.ops.segment_sum(values.reshape(-1), slots.reshape(-1), num_segments=num_slots)
    return sums.reshape(num_pairs, 2)
