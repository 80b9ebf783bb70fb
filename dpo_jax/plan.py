"""Plan a TPU-pod run on a CPU: compile the real train step for a TPU topology, ahead of time.

    python -m dpo_jax.plan --config=configs/hh_pythia28b.py --topology=v4:2x2x1 \
        --topology=v5e:2x4
    python -m dpo_jax.plan --config=configs/dpo.py --config.model.preset=llama-3-8b \
        --config.data.max_length=1024 --topology=v5p:2x4x4 --search

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU: `get_topology_desc` describes the
chips of a named topology, and XLA's TPU compiler compiles the exact DPO / SFT step
(`make_dpo_step` / `make_sft_step`, the config's optimizer, loss, scoring, accumulation and
sharding rules) for them from abstract params, optimizer state, reference and batch
(`ShapeDtypeStruct`s with their `NamedSharding`s): no weights are read, nothing allocated.

Per device it reports the bytes of params, optimizer state, reference and batch (from the
shardings), XLA's temp and total against the device's HBM; model FLOPs per step (policy
forward + backward on both responses of every pair, plus the reference forward when the
reference is params) next to XLA's count; and a roofline step time,
max(max(XLA, model) FLOPs / peak, XLA bytes / HBM bandwidth), with the MFU it implies. The roofline
ignores inter-chip communication: it is a lower bound on the step time (an upper bound on
MFU), not a promise; `--search` ranks by it, so it favours little sharding whenever that
fits (data parallelism's gradient all-reduce is not counted either). `--search` compiles
a small grid (mesh over data/fsdp/tensor, remat policy, micro-batches) and prints the
fastest that fits.

Per device = per chip: v4 and v5p chips run their two TensorCores as one megacore device,
as on a live Cloud TPU host (v4 asks the topology for it: chip_config_name="megacore").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax import models, parallel
from dpo_jax.models import presets
from dpo_jax.models.hf_config import config_from_hf
from dpo_jax.train.optimizers import make_optimizer
from dpo_jax.train.scoring import ScoringOptions
from dpo_jax.train.state import state_from_params
from dpo_jax.train.steps import Guard, make_dpo_step, make_sft_step
from dpo_jax.train.validate import objective_of

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s."""

    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


# Per chip, from Google Cloud's TPU system architecture pages, "Key chip specifications":
# https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16; HBM2 32 GiB, 1200 GBps),
# https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16; HBM2 16 GB, 819 GBps),
# https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16; HBM2e 95 GB, 2765 GBps),
# https://docs.cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16; HBM 32 GB, 1638 GBps),
# as stored in 2026. Their "GB" of HBM are binary: XLA:TPU's own limit for one program
# (its out-of-memory error, "available HBM") is 30.75 GiB on v4, 15.75 on v5e, 95.74 on
# v5p and 31.25 on v6e, above 16e9 / 95e9 / 32e9 bytes, so capacities are in GiB.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GiB, 275e12, 1200e9),
    "v5e": Chip(16 * GiB, 197e12, 819e9),
    "v5p": Chip(95 * GiB, 459e12, 2765e9),
    "v6e": Chip(32 * GiB, 918e12, 1638e9),
}


# ------------------------------------------------------------------------------------------
# The topology and the model of a config
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named TPU topology ("v5e:16x16"), its JAX devices and what each of them has."""

    name: str
    devices: tuple
    hbm_bytes: int  # per device (= chip)
    peak_flops: float
    hbm_bandwidth: float

    @classmethod
    def get(cls, name: str) -> Topology:
        generation = name.split(":")[0]
        if generation not in CHIPS or ":" not in name:
            raise ValueError(
                f"--topology={name!r}: expected GENERATION:SHAPE with GENERATION one of "
                f"{sorted(CHIPS)}, e.g. v5e:2x4, v4:2x2x1, v5p:2x4x4"
            )
        from jax.experimental import topologies  # needs libtpu

        # Compiling needs no TPU of our own: let libtpu load next to other processes
        # (without this it takes a machine-wide lock file and refuses a second user).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        # v4's descriptor lists each TensorCore as a device unless asked for megacore,
        # which is how Cloud TPU v4 hosts run (and what mesh_utils requires).
        kwargs = {"chip_config_name": "megacore"} if generation == "v4" else {}
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
        devices = tuple(desc.devices)
        if len({tuple(d.coords) for d in devices}) != len(devices):
            raise ValueError(f"--topology={name!r}: expected one device per chip")
        chip = CHIPS[generation]
        return cls(name, devices, chip.hbm_bytes, chip.peak_flops, chip.hbm_bandwidth)


def model_config(config: ml_collections.ConfigDict, **overrides) -> models.ModelConfig:
    """The run's `ModelConfig` as `train.loop.build_model` makes it, without any weights:
    an HF directory's config.json, a preset, or the tiny model (the tiny tokenizer's 256)."""
    m = config.model
    fields = {**m.overrides.to_dict(), "dtype": m.dtype, "remat": m.remat}
    fields["scan_layers"] = bool(m.get("scan_layers", False))
    fields["attention"] = m.get("attention", "xla")
    fields.update(overrides)
    if m.hf_path:
        where = os.path.join(m.hf_path, "config.json")
        with open(where) as f:
            return config_from_hf(json.load(f), where=where, **fields)
    if m.preset == "tiny":
        return models.ModelConfig.tiny(**fields)
    return presets.get(m.preset, **fields)


def model_flops(cfg: models.ModelConfig, config, stage: str) -> float:
    """Model FLOPs of one step (global): what the math needs, remat recompute excluded.

    DPO: policy forward + backward over 2B sequences of L tokens, plus the reference's
    forward (a third of that per token, PaLM's 2N vs 6N) when the reference is params;
    cached or no reference costs nothing in the step. SFT: B sequences, no reference.
    """
    s, length = config[stage], int(config.data.max_length)
    train = presets.flops_per_token(cfg, length)
    if stage == "sft":
        return s.batch_size * length * train
    tokens = 2 * s.batch_size * length
    reference = train / 3 if config.dpo.reference == "params" else 0.0
    return tokens * (train + reference)


# ------------------------------------------------------------------------------------------
# Compiling one configuration
# ------------------------------------------------------------------------------------------


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_batch(config, stage: str, mesh) -> dict:
    """The stage's padded batch as ShapeDtypeStructs: DPO [B, 2, L] (+ ref_logps [B, 2]
    when cached), SFT [B, L]; int32 like `dpo_jax.data.batching` makes them."""
    s, length = config[stage], int(config.data.max_length)
    sharding = parallel.batch_sharding(mesh)
    rows = (s.batch_size, 2, length) if stage == "dpo" else (s.batch_size, length)

    def arr(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    batch = {f: arr(rows) for f in ("tokens", "positions", "segment_ids", "loss_mask")}
    batch["pair_mask" if stage == "dpo" else "example_mask"] = arr(rows[:1])
    if stage == "dpo" and config.dpo.reference == "cached":
        batch["ref_logps"] = arr((s.batch_size, 2), jnp.float32)
    return batch


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


@dataclasses.dataclass
class Plan:
    """What one compiled configuration needs per device, and how fast it could run."""

    topology: str
    stage: str
    devices: int
    mesh_shape: tuple[int, int, int]
    remat: str
    scan_layers: bool
    accum_steps: int
    params_bytes: int
    optimizer_bytes: int
    reference_bytes: int
    batch_bytes: int
    argument_bytes: int  # XLA: state + batch + reference as laid out on the TPU
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs (the state)
    temp_bytes: int  # XLA: activations, gradients, all other buffers of the step
    host_temp_bytes: int  # XLA: buffers in host memory (offloaded remat residuals)
    code_bytes: int
    hbm_bytes: int
    model_flops: float  # per device
    xla_flops: float  # per device
    xla_bytes_accessed: float  # per device
    peak_flops: float
    hbm_bandwidth: float
    compile_s: float
    oom: bool = False  # XLA refused to compile: over HBM by its own count (total >= that)

    @property
    def total_bytes(self) -> int:
        """Peak HBM of the step: inputs, outputs not written in place, temps, the program."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return not self.oom and self.total_bytes <= self.hbm_bytes

    @property
    def step_time(self) -> float:
        """Roofline seconds per step (no communication): compute- or HBM-bound.

        Compute is never taken below the model FLOPs: XLA counts any while loop's body
        once, and besides our micro-batch and layer loops (corrected for) the TPU compiler
        makes its own, e.g. collective matmuls that loop over the FSDP shards of a weight
        (measured: XLA's count falls below the model FLOPs on v5e:2x4 and v5p:2x4x4 with
        FSDP 8 and 32)."""
        flops = max(self.xla_flops, self.model_flops)
        return max(flops / self.peak_flops, self.xla_bytes_accessed / self.hbm_bandwidth)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time * self.peak_flops)


def _mesh_shape(shape: Sequence[int], n: int) -> tuple[int, int, int]:
    shape = [int(s) for s in shape]
    if -1 in shape:
        i = shape.index(-1)
        shape[i] = n // max(1, math.prod(s for s in shape if s != -1))
    return tuple(shape)


@dataclasses.dataclass
class _Compiled:
    compiled: object  # None when XLA refused it for lack of HBM (see `oom`)
    state: object
    batch: dict
    reference: object
    seconds: float
    oom: tuple[int, int] | None = None  # (total bytes, argument bytes) XLA reported

    def cost(self, accum_steps: int) -> tuple[float, float]:
        """(FLOPs, bytes accessed) per device. XLA's cost analysis counts a while loop's
        body once: the micro-batch scan runs it accum_steps times (scaling by it
        over-counts the small optimizer update outside the loop)."""
        cost = self.compiled.cost_analysis()
        return float(cost["flops"]) * accum_steps, float(cost["bytes accessed"]) * accum_steps


def _compile(config, stage, topology, shape, cfg, accum_steps) -> _Compiled:
    """The stage's jitted step (`parallel.jit_step`, as training builds it) compiled for
    `topology` on a mesh of `shape`, from abstract arguments."""
    s = config[stage]
    mesh = parallel.make_mesh(shape, devices=topology.devices)
    rules = parallel.check_rules(config.parallel.logical_axis_rules, mesh)
    model = models.DecoderLM(cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    specs = parallel.param_logical_specs(boxed["params"])
    params = parallel.unbox(boxed["params"])
    tx = make_optimizer({**s.optimizer.to_dict(), "total_steps": max(int(s.steps), 1)})
    state = jax.eval_shape(lambda p: state_from_params(p, tx, jax.random.key(0)), params)
    state_shardings = parallel.state_shardings(state, mesh, rules, param_specs=specs)
    state = _abstract(state, state_shardings)
    batch = abstract_batch(config, stage, mesh)

    reference, reference_shardings = None, None
    guard = Guard(config.guard.max_update_ratio)
    scoring = ScoringOptions.from_config(s)
    if stage == "dpo":
        step = make_dpo_step(model=model, tx=tx, objective=objective_of(config),
                             scoring=scoring, accum_steps=accum_steps, guard=guard)  # fmt: skip
        if config.dpo.reference == "params":
            ref_rules = parallel.REFERENCE_RULES[config.parallel.reference_rules]
            reference_shardings = parallel.state_shardings(params, mesh, ref_rules,
                                                           param_specs=specs)  # fmt: skip
            reference = _abstract(params, reference_shardings)
    else:
        step = make_sft_step(model=model, tx=tx, scoring=scoring, accum_steps=accum_steps,
                             guard=guard)  # fmt: skip
    jitted = parallel.jit_step(step, mesh, state_shardings, reference_shardings,
                               parallel.batch_sharding(mesh), rules=rules)  # fmt: skip
    start = time.perf_counter()
    try:
        compiled = jitted.lower(state, batch, reference).compile()
    except jax.errors.JaxRuntimeError as err:
        # XLA:TPU refuses a program that cannot fit ("CompileTimeHbmOom"): that is the
        # answer the plan wants, with the sizes its message gives.
        oom = _hbm_oom(str(err))
        if oom is None:
            raise
        return _Compiled(None, state, batch, reference, time.perf_counter() - start, oom)
    return _Compiled(compiled, state, batch, reference, time.perf_counter() - start)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([0-9.]+)([KMGT]?)"


def _hbm_oom(message: str) -> tuple[int, int] | None:
    """(total, argument) bytes from XLA:TPU's out-of-HBM compile error, else None."""
    if "RESOURCE_EXHAUSTED" not in message or "hbm" not in message:
        return None
    total = re.search(r"Total hbm usage >= " + _SIZE, message)
    arguments = re.search(r"\n\s*arguments\s+" + _SIZE, message)
    if total is None or arguments is None:
        return None
    size = lambda m: int(float(m.group(1)) * _UNITS[m.group(2)])  # noqa: E731
    return size(total), size(arguments)


def _scanned_cost(config, stage, topology, shape, cfg, accum_steps) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of a scanned model, whose layer loop XLA counts once: the
    same step unrolled with 1 and 2 layers gives the cost outside the layers and per layer
    (cost is linear in depth), extrapolated to num_layers. Two small compiles."""
    one, two = (
        _compile(config, stage, topology, shape,
                 cfg.replace(num_layers=k, scan_layers=False), accum_steps).cost(accum_steps)
        for k in (1, 2)
    )  # fmt: skip
    n = cfg.num_layers
    return tuple(a + (n - 1) * (b - a) for a, b in zip(one, two, strict=True))


def compile_step(
    config: ml_collections.ConfigDict,
    stage: str,
    topology: Topology,
    *,
    mesh_shape: Sequence[int] | None = None,
    remat=None,
    accum_steps: int | None = None,
    scan_layers: bool | None = None,
) -> Plan:
    """AOT-compiles the stage's train step for `topology`; `mesh_shape`, `remat`,
    `accum_steps` and `scan_layers` default to the config's (config.parallel.mesh_shape,
    model.remat, <stage>.accum_steps, model.scan_layers)."""
    s = config[stage]
    fields = {} if remat is None else {"remat": remat}
    if scan_layers is not None:
        fields["scan_layers"] = scan_layers
    cfg = model_config(config, **fields)
    accum_steps = int(s.accum_steps if accum_steps is None else accum_steps)
    n = len(topology.devices)
    shape = _mesh_shape(config.parallel.mesh_shape if mesh_shape is None else mesh_shape, n)
    if math.prod(shape) != n or s.batch_size % (shape[0] * shape[1]):
        raise ValueError(
            f"mesh (data, fsdp, tensor) = {shape} on {topology.name} ({n} devices): the mesh "
            f"must use every device and data x fsdp must divide {stage}.batch_size="
            f"{s.batch_size}; set --config.parallel.mesh_shape"
        )
    out = _compile(config, stage, topology, shape, cfg, accum_steps)
    if out.compiled is None:  # out of HBM: no program to analyse, XLA's sizes instead
        total, arguments = out.oom
        memory = dict(argument=arguments, output=0, alias=0, temp=total - arguments, code=0,
                      host_temp=0)  # fmt: skip
        flops = bytes_accessed = math.nan
    else:
        m = out.compiled.memory_analysis()
        memory = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                      alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                      code=m.generated_code_size_in_bytes,
                      host_temp=m.host_temp_size_in_bytes)  # fmt: skip
        if cfg.scan_layers:
            flops, bytes_accessed = _scanned_cost(config, stage, topology, shape, cfg,
                                                  accum_steps)  # fmt: skip
        else:
            flops, bytes_accessed = out.cost(accum_steps)
    return Plan(
        topology=topology.name,
        stage=stage,
        devices=n,
        mesh_shape=shape,
        remat=cfg.remat,
        scan_layers=cfg.scan_layers,
        accum_steps=accum_steps,
        params_bytes=device_bytes(out.state.params),
        optimizer_bytes=device_bytes(out.state.opt_state),
        reference_bytes=0 if out.reference is None else device_bytes(out.reference),
        batch_bytes=device_bytes(out.batch),
        argument_bytes=memory["argument"],
        output_bytes=memory["output"],
        alias_bytes=memory["alias"],
        temp_bytes=memory["temp"],
        host_temp_bytes=memory["host_temp"],
        code_bytes=memory["code"],
        hbm_bytes=topology.hbm_bytes,
        model_flops=model_flops(cfg, config, stage) / n,
        xla_flops=flops,
        xla_bytes_accessed=bytes_accessed,
        peak_flops=topology.peak_flops,
        hbm_bandwidth=topology.hbm_bandwidth,
        compile_s=out.seconds,
        oom=out.oom is not None,
    )


# ------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------

# Least recompute first, so that the first that fits is the fastest. dots_saveable is left
# out: it keeps the [L, L] attention scores of every layer, the first thing to run out of
# HBM at DPO lengths (compile it with --config.model.remat=dots_saveable).
REMAT_ORDER = ("none", "dots_with_no_batch_dims_saveable", "full")
REMAT_LABELS = {
    "none": "none",
    "full": "full",
    "dots_saveable": "dots",
    "dots_with_no_batch_dims_saveable": "dots_nb",
    "offload_dots_with_no_batch_dims": "offload",
}


def candidate_meshes(n: int, config, stage: str = "dpo") -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) shapes worth trying on n devices: FSDP over all of them with
    tensor parallelism of 1, 2, 4 or 8 (dividing the kv heads), and pure data parallelism
    (every device a full copy); only those whose batch shards (data x fsdp) divide the
    batch."""
    kv_heads = model_config(config).num_kv_heads
    batch = config[stage].batch_size
    meshes = [(1, n // t, t) for t in (1, 2, 4, 8) if n % t == 0 and kv_heads % t == 0]
    return [m for m in [*meshes, (n, 1, 1)] if batch % (m[0] * m[1]) == 0]


def search(config, stage: str, topology: Topology, log=print) -> list[Plan]:
    """Every compiled configuration, searched mesh by mesh: for each, the least remat and
    fewest micro-batches that fit (more of either only adds time)."""
    s = config[stage]
    plans = []
    for mesh in candidate_meshes(len(topology.devices), config, stage):
        shards = mesh[0] * mesh[1]
        accums = [a for a in (1, 2, 4, 8) if s.batch_size % (a * shards) == 0]
        for remat, accum in itertools.product(REMAT_ORDER, accums):
            plan = compile_step(config, stage, topology, mesh_shape=mesh, remat=remat,
                                accum_steps=accum)  # fmt: skip
            plans.append(plan)
            log(format_row(plan))
            if plan.fits:
                break
    return plans


def best(plans: Sequence[Plan]) -> Plan | None:
    fitting = [p for p in plans if p.fits]
    return min(fitting, key=lambda p: p.step_time) if fitting else None


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

HEADER = (
    f"{'topology':<11} {'stage':<5} {'mesh d,f,t':<11} {'remat':<7} {'scan':<4} {'A':>2} "
    f"{'params':>7} {'optim':>7} {'ref':>7} {'temp':>7} {'host':>7} {'total':>7} {'HBM':>6} "
    f"{'fits':<4} "
    f"{'modelTF':>8} {'xlaTF':>8} {'step_s':>7} {'MFU':>5} {'compile':>7}"
)


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def format_row(p: Plan) -> str:
    """One line per plan: bytes in GiB per device, TFLOPs per device per step."""
    mesh = ",".join(str(x) for x in p.mesh_shape)
    return (
        f"{p.topology:<11} {p.stage:<5} {mesh:<11} {REMAT_LABELS[p.remat]:<7} "
        f"{'yes' if p.scan_layers else 'no':<4} {p.accum_steps:>2} "
        f"{_gib(p.params_bytes)} {_gib(p.optimizer_bytes)} {_gib(p.reference_bytes)} "
        f"{_gib(p.temp_bytes)} {_gib(p.host_temp_bytes)} {_gib(p.total_bytes)} "
        f"{p.hbm_bytes / GiB:6.1f} "
        f"{'yes' if p.fits else 'OOM' if p.oom else 'NO':<4} "
        f"{p.model_flops / 1e12:8.3f} {p.xla_flops / 1e12:8.3f} "
        f"{p.step_time:7.3f} {p.mfu:5.1%} {p.compile_s:6.1f}s"
    )


def run():
    """`python -m dpo_jax.plan`: flags are defined here, not at import, so that importing
    this module next to dpo_jax.main (which also defines --config) is harmless."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Training config (NAME.py:ARG).")
    topology = flags.DEFINE_multi_string(
        "topology", None, "TPU topology, e.g. v5e:16x16 (repeat the flag for several)."
    )
    stages = flags.DEFINE_multi_enum(
        "stage", None, ["sft", "dpo"], "Stages to plan (default: the config's stages)."
    )
    do_search = flags.DEFINE_bool(
        "search", False, "Search mesh shapes, remat and micro-batches; print the best that fits."
    )
    flags.mark_flags_as_required(["config", "topology"])

    def main(argv):
        del argv
        # The step is compiled for the topology's TPU devices; the host never needs to look
        # for a TPU of its own (libtpu would print errors on a machine without one).
        jax.config.update("jax_platforms", "cpu")
        report(config.value, topology.value, stages.value or list(config.value.stages),
               search_grid=do_search.value)  # fmt: skip

    app.run(main)


def report(config, topologies: Sequence[str], stages: Sequence[str], *, search_grid=False):
    """Prints one row per compiled configuration (all of them with `search_grid`, then the
    best that fits)."""
    print(
        "per device; GiB; TFLOPs per step; step_s/MFU: roofline without communication "
        "(see dpo_jax/plan.py)"
    )
    print(HEADER, flush=True)
    for name, stage in itertools.product(topologies, stages):
        topology = Topology.get(name)
        if search_grid:
            chosen = best(search(config, stage, topology, log=lambda r: print(r, flush=True)))
            print(f"best {name} {stage}: " + (format_row(chosen) if chosen else "nothing fits"))
        else:
            print(format_row(compile_step(config, stage, topology)), flush=True)


if __name__ == "__main__":
    run()
