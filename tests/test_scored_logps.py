"""The unembedding only where scored (issue 12, item 3): `token_logps_from_features(...,
loss_mask=)` and `ScoringOptions.scored_only` against the full paths, values and gradients.

The full paths are the chunked path over every position and the `[N, L, V]` logits path;
float32, 1e-5, padded and packed batches (and prompt-shared rows for the reference),
policy (gradients) and reference (values), vocabulary blocks that do not divide V.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_testlib as lib

from dpo_jax import logprobs, losses
from dpo_jax.data import shared_prompts
from dpo_jax.train import defaults, scoring, steps
from dpo_jax.train import state as train_state

D, V = 16, 50


def _features(seed, rows, length):
    """Random float32 hidden [R, L, D], unembed [D, V], tokens [R, L], per-row weights."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(rows, length, D)).astype(np.float32)
    unembed = (0.7 * rng.normal(size=(D, V))).astype(np.float32)
    tokens = rng.integers(0, V, size=(rows, length)).astype(np.int32)
    weights = rng.normal(size=(rows, length)).astype(np.float32)
    return tuple(map(jnp.asarray, (hidden, unembed, tokens, weights)))


def _spans(rows, length, spans):
    """0/1 loss_mask [R, L] with ones on the given (row, start, stop) spans."""
    mask = np.zeros((rows, length), np.int32)
    for row, start, stop in spans:
        mask[row, start:stop] = 1
    return jnp.asarray(mask)


@functools.partial(
    jax.jit,
    static_argnames=("scored", "chunk_size", "vocab_chunk_size", "row_groups", "keep_logits"),
)
def _loss_and_grads(
    hidden,
    unembed,
    tokens,
    weights,
    mask,
    scored,
    chunk_size,
    vocab_chunk_size,
    row_groups=None,
    keep_logits=False,
):
    """A weighted masked sum of token log-probs, its value, the log-probs and d/d(hidden,
    unembed); the head at every position (scored=False) or only where scored."""

    def loss(hidden, unembed):
        logps = logprobs.token_logps_from_features(
            hidden,
            unembed,
            tokens,
            loss_mask=mask if scored else None,
            row_groups=row_groups,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            keep_logits=keep_logits,
        )
        return logprobs.masked_sum(logps * weights, mask).sum(), logps

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, unembed)


# A row scored to its last token, a row scored in two spans (a packed row), a row with
# nothing scored, a row scored but for its first token: every chunk count from 0 to all.
SPANS = [(0, 9, 23), (1, 2, 6), (1, 13, 19), (3, 1, 23)]


@pytest.mark.parametrize("keep_logits", [False, True])
@pytest.mark.parametrize(
    "chunk_size, vocab_chunk_size, row_groups",
    # 7 and 16 do not divide V = 50; row groups: each row alone (None), pairs of rows, all.
    [(4, 7, None), (5, None, None), (256, 16, None), (1, 50, None), (4, 7, 2), (3, 16, 1)],
)
def test_scored_only_equals_every_position_values_and_grads(
    chunk_size, vocab_chunk_size, row_groups, keep_logits
):
    hidden, unembed, tokens, weights = _features(0, 4, 23)
    mask = _spans(4, 23, SPANS)
    args = (hidden, unembed, tokens, weights, mask)
    sizes = dict(chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
    (want, want_logps), want_grads = _loss_and_grads(*args, scored=False, **sizes)
    # keep_logits: the backward pass from the forward's logits, none recomputed.
    (got, got_logps), got_grads = _loss_and_grads(
        *args, scored=True, row_groups=row_groups, keep_logits=keep_logits, **sizes
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    scored = np.asarray(mask) != 0
    np.testing.assert_allclose(np.where(scored, got_logps, 0.0), np.where(scored, want_logps, 0.0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert np.all(np.asarray(got_logps)[~scored] == 0.0)  # the contract: 0 where unscored
    lib.assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)
    # Not trivially 0: every position that predicts a scored token gets a hidden gradient.
    assert np.all(np.abs(np.asarray(got_grads[0])[:, :-1]).sum(-1)[scored[:, 1:]] > 0)


@pytest.mark.parametrize(
    "row_groups, spans",
    [
        (None, [(0, 3, 11), (1, 15, 23)]),  # each row alone, 8 scored tokens each
        (1, [(0, 3, 15), (1, 19, 23)]),  # 12 + 4 scored tokens, dealt 8 + 8 over the rows
    ],
)
def test_head_never_sees_an_unscored_position(row_groups, spans):
    """NaN hidden states where no scored token is predicted: the full path's unembed
    gradient is NaN (NaN * 0 in the head's backward), the scored-only path never reads them.

    Both cases put 8 scored positions in each head row: 2 chunks of 4, all scored; the
    other chunks (NaN positions only) are skipped, forward and backward."""
    hidden, unembed, tokens, weights = _features(1, 2, 23)
    mask = _spans(2, 23, spans)
    predicts_scored = np.asarray(mask)[:, 1:] != 0  # position t-1 predicts token t
    poison = np.pad(~predicts_scored, ((0, 0), (0, 1)), constant_values=True)
    hidden = jnp.where(poison[..., None], jnp.nan, hidden)
    args = (hidden, unembed, tokens, weights, mask)
    sizes = dict(chunk_size=4, vocab_chunk_size=16)
    (full, _), (_, full_dw) = _loss_and_grads(*args, scored=False, **sizes)
    assert np.isfinite(full) and np.isnan(np.asarray(full_dw)).any()
    (got, logps), (dh, dw) = _loss_and_grads(*args, scored=True, row_groups=row_groups, **sizes)
    assert np.isfinite(got) and np.all(np.isfinite(logps)) and np.all(np.isfinite(dw))
    assert np.all(np.asarray(dh)[poison] == 0.0)
    clean = jnp.where(poison[..., None], 0.0, hidden)
    (want, _), (_, want_dw) = _loss_and_grads(clean, *args[1:], scored=False, **sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-6)


def test_nothing_scored_gives_zeros_and_zero_grads():
    hidden, unembed, tokens, weights = _features(2, 3, 9)
    mask = jnp.zeros((3, 9), jnp.int32)
    (value, logps), (dh, dw) = _loss_and_grads(
        hidden, unembed, tokens, weights, mask, scored=True, chunk_size=4, vocab_chunk_size=16
    )
    assert float(value) == 0.0 and not np.any(logps) and not np.any(dh) and not np.any(dw)


@pytest.mark.parametrize("scored", [False, True])
def test_kept_logits_give_the_recomputing_paths_values_and_grads(scored):
    """keep_logits (every position, or scored only with skipped chunks) against the path
    that recomputes the logits in the backward pass and against the full [R, L, V] logits."""
    hidden, unembed, tokens, weights = _features(5, 4, 23)
    mask = _spans(4, 23, SPANS)
    args = (hidden, unembed, tokens, weights, mask)
    (want, want_logps), want_grads = _loss_and_grads(
        *args, scored=scored, chunk_size=4, vocab_chunk_size=7
    )
    (got, got_logps), got_grads = _loss_and_grads(
        *args, scored=scored, chunk_size=4, vocab_chunk_size=7, keep_logits=True
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_logps, want_logps, rtol=1e-5, atol=1e-6)
    lib.assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)

    def full(hidden, unembed):
        logps = logprobs.token_logps(jnp.einsum("rld,dv->rlv", hidden, unembed), tokens)
        return logprobs.masked_sum(logps * weights, mask).sum()

    full_value, full_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, unembed)
    np.testing.assert_allclose(got, full_value, rtol=1e-5)
    lib.assert_trees_close(got_grads, full_grads, rtol=1e-5, atol=1e-5)


def test_out_of_range_scored_target_is_nan_and_mask_shape_checked():
    hidden, unembed, tokens, _ = _features(3, 2, 9)
    mask = _spans(2, 9, [(0, 2, 9), (1, 4, 6)])
    tokens = tokens.at[0, 5].set(V)  # scored, out of range: NaN as on the full path
    logps = logprobs.token_logps_from_features(hidden, unembed, tokens, loss_mask=mask)
    assert np.isnan(logps[0, 5]) and np.isfinite(np.delete(np.asarray(logps[0]), 5)).all()
    with pytest.raises(ValueError, match=r"loss_mask shape \(2, 8\) does not match tokens"):
        logprobs.token_logps_from_features(hidden, unembed, tokens, loss_mask=mask[:, :8])


# ------------------------------------------------------------------------------------------
# Scoring and the DPO step on a tiny model (fixtures: tests/train_testlib.py)
# ------------------------------------------------------------------------------------------

FULL_LOGITS = scoring.ScoringOptions(memory_efficient=False)
EVERY_POSITION = scoring.ScoringOptions(True, chunk_size=5, vocab_chunk_size=24, scored_only=False)
SCORED_ONLY = scoring.ScoringOptions(True, chunk_size=5, vocab_chunk_size=24, scored_only=True)
BALANCED = dataclasses.replace(SCORED_ONLY, scored_row_groups=1)


def _shared_batch(pairs):
    """Prompt sharing (layout packed_shared): 8 rows of 2 L holding the 5 pairs."""
    plan = shared_prompts.plan_shared_packing(pairs, num_rows=8, row_length=2 * lib.L, max_pairs=8)
    assert not plan.leftover
    return shared_prompts.shared_batch(pairs, plan, row_length=2 * lib.L, max_pairs=8)


@pytest.mark.parametrize("layout", ["padded", "packed", "packed_shared"])
def test_reference_pair_logps_equal_the_full_paths(model, reference, padded, packed, layout):
    if layout == "packed_shared":
        batch = _shared_batch(lib.random_pairs(5))
    else:
        batch = {"padded": padded, "packed": packed}[layout]
    score = jax.jit(scoring.pair_logps, static_argnames=("model", "options"))
    want = score(reference, batch, model=model, options=FULL_LOGITS)
    assert np.all(np.asarray(want)[:5] < 0) and np.all(np.asarray(want)[5:] == 0)
    groups = dataclasses.replace(SCORED_ONLY, scored_row_groups=2)  # 2 groups of 4 or 8 rows
    for options in (EVERY_POSITION, SCORED_ONLY, BALANCED, groups):
        got = score(reference, batch, model=model, options=options)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(options))


def _adamw_run(model, policy, reference, batches, options, objective):
    """AdamW steps (clipping 1.0) over `batches`: the final params and the step metrics."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    step = jax.jit(steps.make_dpo_step(model=model, tx=tx, objective=objective, scoring=options))
    state = train_state.state_from_params(policy, tx, jax.random.PRNGKey(0))
    metrics = []
    for batch in batches:
        state, m = step(state, batch, reference)
        metrics.append(m)
    return state.params, metrics


@pytest.mark.parametrize(
    "layout, options",
    [
        ("padded", SCORED_ONLY),
        ("packed", BALANCED),
        ("packed", dataclasses.replace(BALANCED, keep_logits=True)),
    ],
    ids=["padded", "packed", "packed-kept-logits"],
)
def test_training_with_scored_only_equals_training_without(
    model, policy, reference, padded, packed, layout, options
):
    """Three AdamW steps from the same params: the switch changes nothing but the cost."""
    batch = {"padded": padded, "packed": packed}[layout]
    other = {"padded": lib.padded_batch, "packed": lib.packed_batch}[layout](lib.random_pairs(6, 1))
    batches = [batch, other, batch]
    runs = [
        _adamw_run(model, policy, reference, batches, options, steps.Objective.create())
        for options in (options, EVERY_POSITION)
    ]
    (got_params, got_metrics), (want_params, want_metrics) = runs
    # Kept logits take the log-sum-exp over the whole vocabulary at once, not block by block
    # online: gradients differ in the last float32 bits, which AdamW's m / sqrt(v) scales up
    # to ~1e-5 on a parameter whose gradient is near 0 (the gradients themselves agree to
    # 1e-6: test_kept_logits_give_the_recomputing_paths_values_and_grads).
    atol = 1e-5 if options.keep_logits else 1e-6
    lib.assert_trees_close(got_params, want_params, rtol=1e-5, atol=atol)
    for got, want in zip(got_metrics, want_metrics, strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The params moved: the comparison is not between two untouched copies.
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), got_params,
                         policy)  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize(
    "loss",
    [
        losses.build("sigmoid", ld_alpha=0.5),  # LD-DPO: policy and reference tokens
        "unlikelihood",  # reference-free, log(1 - p) of each scored rejected token
    ],
    ids=["ld", "unlikelihood"],
)
def test_token_level_losses_read_only_scored_entries(model, policy, reference, padded, loss):
    """Per-token losses get the scattered-back token log-probs (0 where unscored)."""
    objective = steps.Objective.create(loss, beta=0.1, hparams={"alpha": 0.5} if loss ==
                                       "unlikelihood" else None)  # fmt: skip
    ref = None if loss == "unlikelihood" else reference
    results = []
    for options in (SCORED_ONLY, FULL_LOGITS):
        step = jax.jit(
            steps.make_dpo_step(model=model, tx=lib.SGD, objective=objective, scoring=options)
        )
        state = lib.sgd_state(policy)
        new_state, metrics = step(state, padded, ref)
        results.append((lib.grads_of(state, new_state), metrics["loss"]))
    (got_grads, got_loss), (want_grads, want_loss) = results
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    lib.assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)


def test_config_key_reaches_the_options():
    config = defaults.base_config()
    assert scoring.ScoringOptions.from_config(config.dpo).scored_only is True
    with config.unlocked():
        config.dpo.logps_scored_only = False
    assert scoring.ScoringOptions.from_config(config.dpo).scored_only is False
    assert scoring.ScoringOptions.from_config(config.dpo).scored_row_groups is None
    with config.unlocked():
        config.dpo.logps_scored_row_groups = 1
    assert scoring.ScoringOptions.from_config(config.dpo).scored_row_groups == 1
    with config.unlocked():
        config.dpo.logps_scored_row_groups = -2
    with pytest.raises(ValueError, match="logps_scored_row_groups must be >= 0"):
        scoring.ScoringOptions.from_config(config.dpo)
    config = defaults.base_config()
    assert scoring.ScoringOptions.from_config(config.dpo).keep_logits is False
    with config.unlocked():
        config.dpo.logps_keep_logits = True
    assert scoring.ScoringOptions.from_config(config.dpo).keep_logits is True


def test_sft_and_unpaired_steps_run_the_head_only_where_scored_exactly(model, policy, reference):
    """The SFT step and the unpaired (KTO) step pass their loss masks too: the same loss
    and gradients as the full-logits path."""
    from dpo_jax.data.batching import pad_sequences, pad_unpaired
    from dpo_jax.data.examples import TokenizedSequence, TokenizedUnpaired
    from dpo_jax.train import unpaired

    pairs = lib.random_pairs(5, seed=3)
    seqs = [TokenizedSequence(p.prompt_ids, p.chosen_ids) for p in pairs]
    sft_batch = pad_sequences(seqs, max_length=lib.L, batch_size=8)
    examples = [
        TokenizedUnpaired(p.prompt_ids, p.chosen_ids, bool(i % 2)) for i, p in enumerate(pairs)
    ]
    kto_batch = pad_unpaired(examples, max_length=lib.L, batch_size=8)
    kto = unpaired.UnpairedObjective.create("kto", 0.5)
    makers = {
        "sft": lambda o: steps.make_sft_step(model=model, tx=lib.SGD, scoring=o),
        "kto": lambda o: unpaired.make_unpaired_step(
            model=model, tx=lib.SGD, objective=kto, scoring=o
        ),
    }
    for name, (batch, ref) in {"sft": (sft_batch, None), "kto": (kto_batch, reference)}.items():
        results = []
        for options in (SCORED_ONLY, FULL_LOGITS):
            state = lib.sgd_state(policy)
            new_state, metrics = jax.jit(makers[name](options))(state, batch, ref)
            results.append((lib.grads_of(state, new_state), metrics["loss"]))
        (got_grads, got_loss), (want_grads, want_loss) = results
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=name)
        lib.assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)
