"""LoRA DPO (`dpo_jax.models.lora`): zero-initialised adapters give full DPO's first step,
the reference is the base with the adapters off, only adapters are optimized, and the
merged export reproduces the trained policy's logits in transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_testlib import SGD, dpo_step, grads_of, padded_batch, random_pairs, sgd_state

from dpo_jax import models
from dpo_jax.models import lora
from dpo_jax.train import steps
from dpo_jax.train.scoring import pair_logps

CONFIG = lora.LoraConfig(rank=4, alpha=8.0)


def lora_step(model, config=CONFIG, **kwargs):
    objective = steps.Objective.create("sigmoid", beta=0.1)
    return jax.jit(
        steps.make_dpo_step(model=model, tx=SGD, objective=objective, lora=config, **kwargs)
    )


@pytest.fixture(scope="module")
def batch():
    return padded_batch(random_pairs(5, seed=3))


def test_adapters_cover_the_targeted_kernels_only(policy):
    adapters = lora.init_adapters(policy, CONFIG, jax.random.key(0))
    attn = adapters["layers_0"]["attn"]
    assert set(attn) == {"q_kernel", "k_kernel", "v_kernel", "o_kernel"}
    assert attn["q_kernel"]["lora_a"].shape == (32, 4)  # [D, r]
    assert attn["q_kernel"]["lora_b"].shape == (4, 2, 16)  # [r, N, H]
    assert attn["o_kernel"]["lora_a"].shape == (2, 16, 4)  # [N, H, r]: two input dims
    assert set(adapters["layers_0"]["mlp"]) == {"gate_kernel", "up_kernel", "down_kernel"}
    assert "embedding" not in adapters and "lm_head" not in adapters
    only_q = lora.init_adapters(policy, lora.LoraConfig(targets=("q",)), jax.random.key(0))
    assert list(only_q) == ["layers_0"] and list(only_q["layers_0"]) == ["attn"]
    with pytest.raises(ValueError, match="targets"):
        lora.LoraConfig(targets=("qkv",))


def test_adapters_shard_like_their_kernels(model, policy):
    from dpo_jax import parallel

    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    specs = lora.adapter_specs(parallel.param_logical_specs(abstract["params"]), policy, CONFIG)
    attn = specs["layers_0"]["attn"]
    assert attn["q_kernel"]["lora_a"] == P("embed", None)
    assert attn["q_kernel"]["lora_b"] == P(None, "heads", "head_dim")
    assert attn["o_kernel"]["lora_a"] == P("heads", "head_dim", None)
    assert attn["o_kernel"]["lora_b"] == P(None, "embed")
    assert specs["layers_0"]["mlp"]["down_kernel"]["lora_b"] == P(None, "embed")


def test_merge_is_w_plus_scaled_a_b_also_for_stacked_layers(policy):
    adapters = lora.init_adapters(policy, CONFIG, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B != 0
    merged = lora.merge(policy, adapters, CONFIG)
    a, b = adapters["layers_0"]["attn"]["o_kernel"].values()
    want = policy["layers_0"]["attn"]["o_kernel"] + 2.0 * np.einsum("nhr,rd->nhd", a, b)
    np.testing.assert_allclose(merged["layers_0"]["attn"]["o_kernel"], want, rtol=1e-6, atol=1e-8)
    assert merged["embedding"] is policy["embedding"]  # untargeted params are not copied
    # A stacked [layers, ...] kernel (scanned layers) merges layer by layer.
    stacked = {"blocks": {"up_kernel": jnp.stack([policy["layers_0"]["mlp"]["up_kernel"]] * 3)}}
    ad = lora.init_adapters(stacked, CONFIG, jax.random.key(1))
    ad = jax.tree.map(lambda x: x + 0.02, ad)
    out = lora.merge(stacked, ad, CONFIG)["blocks"]["up_kernel"]
    a, b = ad["blocks"]["up_kernel"]["lora_a"], ad["blocks"]["up_kernel"]["lora_b"]
    assert a.shape == (3, 32, 4) and b.shape == (3, 4, 64)
    for i in range(3):
        want = stacked["blocks"]["up_kernel"][i] + 2.0 * a[i] @ b[i]
        np.testing.assert_allclose(out[i], want, rtol=1e-6, atol=1e-8)


def test_zero_initialised_adapters_give_full_dpo_first_step(model, policy, batch):
    """B = 0: the same loss and metrics as full DPO from the same params, and the adapters'
    gradients are the full gradients carried through W_eff = W + s A B (dL/dB = s A^T dL/dW,
    dL/dA = 0)."""
    reference = jax.tree.map(jnp.copy, policy)
    full_state, full = dpo_step(model)(sgd_state(policy), batch, reference)
    adapters = lora.init_adapters(policy, CONFIG, jax.random.key(0))
    lora_state, ours = lora_step(model)(sgd_state(adapters), batch, policy)
    for key in ("loss", "rewards/chosen", "logps/chosen", "logps/rejected", "tokens"):
        np.testing.assert_allclose(ours[key], full[key], rtol=1e-6, atol=1e-7, err_msg=key)
    w_grads = grads_of(sgd_state(policy), full_state)
    a_grads = grads_of(sgd_state(adapters), lora_state)
    for block, name in (("attn", "q_kernel"), ("attn", "o_kernel"), ("mlp", "down_kernel")):
        g = a_grads["layers_0"][block][name]
        a = adapters["layers_0"][block][name]["lora_a"]
        w = w_grads["layers_0"][block][name]
        n_in = lora.PROJECTIONS[name[: -len("_kernel")]][0]
        want_b = CONFIG.scale * np.tensordot(np.asarray(a), w, axes=(range(n_in), range(n_in)))
        np.testing.assert_allclose(g["lora_b"], want_b, rtol=1e-4, atol=1e-8, err_msg=name)
        np.testing.assert_array_equal(g["lora_a"], 0.0)


def test_the_reference_is_the_base_with_adapters_off(model, policy, batch):
    """After updates (adapters non-zero, the policy moved), the step's reference log-probs
    are the base model's: implied by its rewards beta (logp - ref_logp)."""
    step = lora_step(model)
    state = sgd_state(lora.init_adapters(policy, CONFIG, jax.random.key(0)))
    for _ in range(3):
        state, metrics = step(state, batch, policy)
    assert float(metrics["rewards/margins"]) != 0.0
    real = np.asarray(batch["pair_mask"]) != 0
    base_logps = np.asarray(pair_logps(policy, batch, model=model))[real]
    evaluate = jax.jit(steps.make_eval_step(model=model, lora=CONFIG))
    m = evaluate(state.params, batch, policy)
    for side, name in enumerate(("chosen", "rejected")):
        ref = m[f"logps/{name}"] - m[f"rewards/{name}"] / 0.1
        np.testing.assert_allclose(ref, base_logps[:, side].mean(), rtol=1e-5)
    # Adapters switched off (B = 0) give the base model's log-probs exactly.
    off = jax.tree.map(jnp.zeros_like, state.params)
    np.testing.assert_array_equal(
        pair_logps(lora.merge(policy, off, CONFIG), batch, model=model),
        pair_logps(policy, batch, model=model),
    )
    # Only adapters carry optimizer state: every moment has an adapter's shape.
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    assert {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim} <= adapter_shapes
    with pytest.raises(ValueError, match="frozen base"):
        step(state, batch, None)


def test_merged_export_reproduces_the_trained_logits_in_transformers(
    model, policy, batch, tmp_path
):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    step = lora_step(model)
    state = sgd_state(lora.init_adapters(policy, CONFIG, jax.random.key(0)))
    for _ in range(3):
        state, _ = step(state, batch, policy)
    merged = jax.device_get(lora.merge(policy, state.params, CONFIG))
    models.to_hf(model, merged, str(tmp_path))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = np.array([[1, 5, 9, 13, 40, 41, 2]], np.int32)
    ours = np.asarray(model.apply({"params": merged}, tokens))
    base = np.asarray(model.apply({"params": policy}, tokens))
    assert np.abs(ours - base).max() > 1e-3  # the adapters changed the model
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_lora_dpo_run_starts_like_full_dpo_and_checkpoints_adapters_only(tmp_path):
    """configs/dpo.py:tiny with `dpo.lora.rank=4`: the first step and the step-0 evaluation
    equal the full-DPO run's (B = 0), the checkpoints hold only the adapters, and the
    export is the merged policy (different from the starting model)."""
    from test_loop import _restore_params, exported, load_config, read_metrics

    from dpo_jax.train import loop

    runs = {}
    for name, rank in (("full", 0), ("lora", 4)):
        config = load_config("dpo")
        with config.unlocked():
            config.dpo.lora.rank = rank
            config.dpo.steps = 2
            config.export_hf = True
        loop.run(config, str(tmp_path / name))
        runs[name] = read_metrics(str(tmp_path / name))
    first = {n: [r for r in m if r["stage"] == "dpo" and r["step"] <= 1] for n, m in runs.items()}
    for a, b in zip(first["lora"], first["full"], strict=True):
        for key in ("loss", "eval/loss", "logps/chosen", "eval/logps/rejected", "tokens"):
            if key in b:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
    state = _restore_params(str(tmp_path / "lora" / "checkpoints" / "dpo" / "2" / "state"))
    assert state and all(k.endswith(("['lora_a']", "['lora_b']")) for k in state)
    full_state = _restore_params(str(tmp_path / "full" / "checkpoints" / "dpo" / "2" / "state"))
    assert sum(x.size for x in state.values()) < sum(x.size for x in full_state.values()) / 4
    merged = exported(str(tmp_path / "lora"))
    assert set(merged) == set(exported(str(tmp_path / "full")))


def test_a_bfloat16_base_trains_float32_adapters(model, policy, batch):
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), policy)
    merged = lora.merge(base, lora.init_adapters(base, CONFIG, jax.random.key(0)), CONFIG)
    assert merged["layers_0"]["attn"]["q_kernel"].dtype == jnp.float32
    # For a bfloat16-compute model the step merges straight into bfloat16 (the model casts
    # each kernel to it anyway): half the merged copy's memory.
    ad = jax.tree.map(lambda x: x + 0.01, lora.init_adapters(base, CONFIG, jax.random.key(0)))
    narrow = lora.merge(base, ad, CONFIG, dtype=jnp.bfloat16)["layers_0"]["mlp"]["up_kernel"]
    wide = lora.merge(base, ad, CONFIG)["layers_0"]["mlp"]["up_kernel"]
    assert narrow.dtype == jnp.bfloat16
    np.testing.assert_array_equal(narrow, wide.astype(jnp.bfloat16))
    state = sgd_state(lora.init_adapters(base, CONFIG, jax.random.key(0)))
    _, full = dpo_step(model)(sgd_state(policy), batch, policy)
    new_state, m = lora_step(model)(state, batch, base)
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(m["loss"], full["loss"], rtol=1e-3)  # the base rounded to bf16
    assert float(m["grad_norm"]) > 0


def test_validate_names_what_lora_cannot_do():
    from test_loop import load_config

    from dpo_jax.train.validate import ConfigError, validate

    config = load_config("dpo")
    with config.unlocked():
        config.dpo.lora.rank = 4
        config.dpo.lora.targets = ("q", "qkv")
        config.dpo.lora.base_dtype = "float16"
        config.dpo.reference = "cached"
    with pytest.raises(ConfigError) as err:
        validate(config)
    problems = "\n".join(err.value.problems)
    assert "config.dpo.lora: LoRA targets ['q', 'qkv']" in problems
    assert "config.dpo.lora.base_dtype='float16'" in problems
    assert "config.dpo.reference='cached': LoRA DPO's reference is its frozen base" in problems


def test_lora_on_scanned_layers_starts_like_full_dpo(batch):
    """Stacked [layers, ...] kernels (`model.scan_layers`): adapters per layer, B = 0 gives
    full DPO's first step."""
    from train_testlib import random_params

    from dpo_jax.models import DecoderLM, ModelConfig

    model = DecoderLM(
        ModelConfig.tiny(
            vocab_size=64,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            mlp_dim=64,
            max_position_embeddings=32,
            scan_layers=True,
        )  # fmt: skip
    )
    policy = random_params(model, 0)
    adapters = lora.init_adapters(policy, CONFIG, jax.random.key(0))
    a = jax.tree.leaves(adapters)[0]
    assert a.shape[0] == 2  # one adapter per layer
    _, full = dpo_step(model)(sgd_state(policy), batch, jax.tree.map(jnp.copy, policy))
    new_state, ours = lora_step(model)(sgd_state(adapters), batch, policy)
    np.testing.assert_allclose(ours["loss"], full["loss"], rtol=1e-6)
    assert float(ours["grad_norm"]) > 0


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_lora_accumulation_gives_the_one_big_batch_step(model, policy, layout):
    """The adapters are merged inside both accumulation paths (one pass for padded pairs,
    two passes for packed rows): micro-batches give the whole batch's gradient."""
    from train_testlib import packed_batch

    pairs = random_pairs(5, seed=4)
    batch = padded_batch(pairs) if layout == "padded" else packed_batch(pairs)
    adapters = jax.tree.map(
        lambda x: x + 0.01, lora.init_adapters(policy, CONFIG, jax.random.key(0))
    )  # B != 0: the merged policy differs from the base
    results = []
    for accum_steps in (1, 2):
        new_state, m = lora_step(model, accum_steps=accum_steps)(sgd_state(adapters), batch, policy)
        results.append((grads_of(sgd_state(adapters), new_state), m))
    (g1, m1), (g2, m2) = results
    assert float(m1["rewards/margins"]) != 0.0
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
