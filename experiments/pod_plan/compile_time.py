"""Compile time of the DPO train step, scanned layers vs the Python loop, by depth.

    python experiments/pod_plan/compile_time.py [--layers=32] [--topology=v5e:2x2]

Narrow models (D=256) so that the time is the compiler's work on the graph, which grows
with the number of unrolled blocks, not with the width. Without --topology the step
compiles for this host's CPU; with it, for that TPU topology (needs libtpu). Prints one
line per (layers, layout): seconds of `lower` (tracing) and of `compile`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dpo_jax import models, parallel  # noqa: E402
from dpo_jax.plan import Topology, abstract_batch  # noqa: E402
from dpo_jax.train.defaults import base_config  # noqa: E402
from dpo_jax.train.optimizers import make_optimizer  # noqa: E402
from dpo_jax.train.state import state_from_params  # noqa: E402
from dpo_jax.train.steps import make_dpo_step  # noqa: E402


def measure(layers: int, scan: bool, devices) -> tuple[float, float]:
    cfg = models.ModelConfig.tiny(
        "llama", num_layers=layers, hidden_size=256, mlp_dim=1024, scan_layers=scan
    )
    config = base_config()
    config.data.max_length = 128
    config.dpo.batch_size = 8
    mesh = parallel.make_mesh((1, len(devices), 1), devices=devices)
    rules = parallel.DEFAULT_RULES
    model = models.DecoderLM(cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))
    specs = parallel.param_logical_specs(boxed["params"])
    params = parallel.unbox(boxed["params"])
    tx = make_optimizer({**config.dpo.optimizer.to_dict(), "total_steps": 1})
    state = jax.eval_shape(lambda p: state_from_params(p, tx, jax.random.key(0)), params)
    shardings = parallel.state_shardings(state, mesh, rules, param_specs=specs)
    ref_shardings = parallel.state_shardings(params, mesh, rules, param_specs=specs)

    def abstract(tree, s):
        return jax.tree.map(
            lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), tree, s
        )

    step = parallel.jit_step(make_dpo_step(model=model, tx=tx), mesh, shardings, ref_shardings,
                             parallel.batch_sharding(mesh), rules=rules)  # fmt: skip
    start = time.perf_counter()
    lowered = step.lower(abstract(state, shardings), abstract_batch(config, "dpo", mesh),
                         abstract(params, ref_shardings))  # fmt: skip
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[32])
    parser.add_argument("--topology", default="")
    args = parser.parse_args()
    devices = Topology.get(args.topology).devices if args.topology else jax.devices()[:1]
    target = args.topology or "cpu"
    for layers in args.layers:
        for scan in (False, True):
            lower_s, compile_s = measure(layers, scan, devices)
            layout = "scan" if scan else "loop"
            times = f"lower {lower_s:.1f}s compile {compile_s:.1f}s"
            print(f"{target} layers={layers} {layout}: {times}", flush=True)


if __name__ == "__main__":
    main()
