"""The pod planner: a tiny model's DPO step compiled for a real TPU topology (v5e:2x2), its
reported memory and FLOPs checked against arithmetic done here from the config alone."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if importlib.util.find_spec("libtpu") is None:
    pytest.skip(
        "libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to plan with",
        allow_module_level=True,
    )

from dpo_jax import models, plan  # noqa: E402

# Big enough that matmuls dominate XLA's FLOP count, small enough to compile in seconds;
# head_dim 128 as in real models (TPU tiles pad a smaller minor dim of a kernel to 128).
D, F, V, N, K, H, LAYERS = 256, 1024, 512, 4, 2, 128, 2
B, L = 8, 128


def tiny_config(reference="params", optimizer="adamw"):
    spec = importlib.util.spec_from_file_location("dpo", os.path.join(ROOT, "configs", "dpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    with c.unlocked():
        c.model.overrides.update(
            hidden_size=D, mlp_dim=F, vocab_size=V, num_heads=N, num_kv_heads=K, head_dim=H
        )
    c.data.max_length = L
    c.dpo.batch_size = B
    c.dpo.reference = reference
    c.dpo.optimizer.name = optimizer
    c.parallel.mesh_shape = (1, 4, 1)  # FSDP over the 4 chips
    return c


def matmul_params():
    """Every param that multiplies activations (llama tiny: untied lm_head, GQA, gated MLP)."""
    attention = D * N * H * 2 + D * K * H * 2
    mlp = 3 * D * F
    return LAYERS * (attention + mlp) + D * V


def all_params():
    norms = (2 * LAYERS + 1) * D
    return matmul_params() + V * D + norms


@pytest.fixture(scope="module")
def topology():
    return plan.Topology.get("v5e:2x2")


@pytest.fixture(scope="module")
def planned(topology):
    return plan.compile_step(tiny_config(), "dpo", topology)


def test_topology_is_four_v5e_chips(topology):
    assert len(topology.devices) == 4
    assert topology.hbm_bytes == 16 * 2**30
    assert topology.peak_flops == 197e12


def test_memory_matches_the_sharding_arithmetic(planned):
    # FSDP over 4: every kernel and embedding has its embed dim (256) split 4 ways; the
    # norm scales [D] are replicated.
    norms = (2 * LAYERS + 1) * D
    params = 4 * ((all_params() - norms) // 4 + norms)
    assert planned.params_bytes == params
    # adamw: two moments shaped like the params, plus int32 step counts (a few bytes).
    assert 2 * params <= planned.optimizer_bytes <= 2 * params + 64
    assert planned.reference_bytes == params  # same rules as the policy ("same")
    batch = (4 * B * 2 * L * 4 + B * 4) // 4  # four int32 [B, 2, L] fields + pair_mask
    assert planned.batch_bytes == batch
    ours = params + planned.optimizer_bytes + planned.reference_bytes + batch
    # XLA's arguments are exactly these arrays, plus TPU tiling padding of tiny ones.
    assert ours <= planned.argument_bytes <= ours * 1.01 + 64 * 1024
    # The donated state (params + optimizer) is written in place.
    state = params + planned.optimizer_bytes
    assert state <= planned.alias_bytes <= state * 1.01 + 64 * 1024
    assert planned.temp_bytes > 0
    assert planned.total_bytes == (
        planned.argument_bytes
        + planned.output_bytes
        - planned.alias_bytes
        + planned.temp_bytes
        + planned.code_bytes
    )
    assert planned.fits


def test_model_flops_are_dpo_flops(planned):
    # Policy forward + backward (6 per non-embedding param per token, PaLM's convention,
    # which counts the norm scales too; 12 * layers * N * H * L for QK^T and PV) on 2B
    # sequences of L tokens, and the reference's forward (a third).
    norms = (2 * LAYERS + 1) * D
    per_token = 6 * (matmul_params() + norms) + 12 * LAYERS * N * H * L
    expected = 2 * B * L * per_token * (1 + 1 / 3) / 4
    assert planned.model_flops == pytest.approx(expected, rel=1e-12)
    # XLA counts the same matmuls plus the elementwise work (norms, softmax, optimizer).
    assert 1.0 <= planned.xla_flops / planned.model_flops <= 1.1
    # The roofline is compute- or HBM-bound, never faster than either.
    assert planned.step_time >= planned.xla_flops / planned.peak_flops
    assert planned.step_time >= planned.model_flops / planned.peak_flops
    assert planned.step_time >= planned.xla_bytes_accessed / planned.hbm_bandwidth
    assert 0 < planned.mfu <= 1


def test_cached_reference_costs_no_reference_flops():
    cfg = models.ModelConfig.tiny(vocab_size=V, hidden_size=D, mlp_dim=F, num_heads=N,
                                  num_kv_heads=K, head_dim=H)  # fmt: skip
    params = plan.model_flops(cfg, tiny_config("params"), "dpo")
    cached = plan.model_flops(cfg, tiny_config("cached"), "dpo")
    assert cached == pytest.approx(params * 3 / 4, rel=1e-12)


def test_micro_batches_and_scanned_layers_count_the_same_flops(planned, topology):
    # XLA counts a loop body once; the plan scales the micro-batch loop by accum_steps and
    # extrapolates the layer scan from 1- and 2-layer compiles: the same math as the loop.
    scanned = plan.compile_step(tiny_config(), "dpo", topology, accum_steps=2, scan_layers=True)
    assert scanned.scan_layers and scanned.accum_steps == 2
    assert scanned.model_flops == planned.model_flops
    assert scanned.xla_flops == pytest.approx(planned.xla_flops, rel=0.02)
    assert scanned.params_bytes == planned.params_bytes


def test_remat_recomputes_the_forward(planned, topology):
    full = plan.compile_step(tiny_config(), "dpo", topology, remat="full")
    assert full.remat == "full" and full.model_flops == planned.model_flops
    # The policy's forward runs twice (its backward needs it again); the reference's not.
    assert planned.xla_flops < full.xla_flops < 1.5 * planned.xla_flops


def test_offload_remat_moves_saved_projections_to_host_memory(planned, topology):
    offload = plan.compile_step(
        tiny_config(), "dpo", topology, remat="offload_dots_with_no_batch_dims"
    )
    assert planned.host_temp_bytes == 0
    # What moves is what dots_with_no_batch_dims_saveable would keep: the projections'
    # outputs of the policy's layers (at least q, k, v and the MLP of one layer).
    rows = B * 2 * L // 4  # the FSDP axis shards the batch over the 4 chips
    one_layer = rows * (N * H + 2 * K * H + 2 * F) * 4  # float32 activations
    assert offload.host_temp_bytes >= one_layer
    assert "offload" in plan.format_row(offload)


def test_best_is_the_fastest_that_fits(planned):
    import dataclasses

    slow = dataclasses.replace(
        planned,
        xla_flops=planned.xla_flops * 2,
        xla_bytes_accessed=planned.xla_bytes_accessed * 2,
    )
    too_big = dataclasses.replace(planned, xla_flops=planned.xla_flops / 2, temp_bytes=2**40)
    assert plan.best([slow, too_big, planned]) is planned
    assert plan.best([too_big]) is None
    assert plan.candidate_meshes(4, tiny_config()) == [(1, 4, 1), (1, 2, 2), (4, 1, 1)]


def test_cli_prints_a_row(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_jax.plan",
            "--config=configs/dpo.py:tiny",
            "--topology=v5e:2x2",
            "--config.parallel.mesh_shape=1,2,2",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("v5e:2x2")]
    assert len(rows) == 1 and " 1,2,2 " in rows[0] and " yes " in rows[0], out.stdout


def test_out_of_hbm_compile_error_is_read_as_a_plan():
    # The head of XLA:TPU's refusal for Pythia-2.8B DPO on v5e:2x4 (batch 64, FSDP 8).
    message = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out"
        " of memory in memory space hbm. Used 15.80G of 15.75G hbm. Exceeded hbm capacity by "
        "55.52M.\n\nTotal hbm usage >= 16.05G:\n    reserved        258.00M \n    program  "
        "        11.68G \n    arguments         4.12G \n\nOutput size 2.75G; shares 2.75G with "
        "arguments.\n"
    )
    assert plan._hbm_oom(message) == (int(16.05 * 2**30), int(4.12 * 2**30))
    assert plan._hbm_oom("RESOURCE_EXHAUSTED: host memory") is None
