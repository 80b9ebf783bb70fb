"""Compiled memory of one DPO training step: full fine-tuning vs LoRA, for a preset model.

Compiles (never runs) the jitted step of `dpo_jax.train.steps.make_dpo_step` for a preset
(default `llama-3.2-1b`, 1.2B parameters) with AdamW and the memory-efficient log-prob
path, in three setups:
  full DPO:        state = every param + AdamW moments; the frozen reference a second copy
  LoRA, f32 base:  state = adapters + their moments; the reference = the frozen base
                   (`config.dpo.lora.rank`, adapters on every attention and MLP projection)
  LoRA, bf16 base: the same with `config.dpo.lora.base_dtype = "bfloat16"`
and prints XLA's buffer statistics (`compiled.memory_analysis()`): arguments (what lives
between steps: state, reference, batch), temp (scratch inside the step) and total =
arguments + outputs + temp - aliased (the donated state is updated in place). Inputs are
ShapeDtypeStructs: nothing is allocated, so a 1B step compiles on a laptop CPU.

    python experiments/lora_memory/step_memory.py
    python experiments/lora_memory/step_memory.py --preset qwen2.5-0.5b --rank 16
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dpo_jax.models import DecoderLM, lora, presets  # noqa: E402
from dpo_jax.parallel import unbox  # noqa: E402
from dpo_jax.train.optimizers import make_optimizer  # noqa: E402
from dpo_jax.train.scoring import ScoringOptions  # noqa: E402
from dpo_jax.train.state import state_from_params  # noqa: E402
from dpo_jax.train.steps import make_dpo_step  # noqa: E402

GIB = 1024**3


def compiled_memory(args, lora_config, base_dtype):
    model = DecoderLM(
        presets.get(args.preset, scan_layers=True, remat="full", dtype=args.compute_dtype)
    )
    tx = make_optimizer({"name": "adamw", "learning_rate": 1e-6, "warmup_steps": 0})
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: unbox(model.init(jax.random.key(0), tokens)["params"]))
    trained = params
    if lora_config is not None:
        trained = jax.eval_shape(lambda k: lora.init_adapters(params, lora_config, k),
                                 jax.random.key(0))  # fmt: skip
    reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype), params)
    state = jax.eval_shape(lambda p: state_from_params(p, tx, jax.random.key(0)), trained)
    shape = (args.pairs, 2, args.length)
    batch = {f: jax.ShapeDtypeStruct(shape, jnp.int32)
             for f in ("tokens", "positions", "segment_ids", "loss_mask")}  # fmt: skip
    batch["pair_mask"] = jax.ShapeDtypeStruct((args.pairs,), jnp.int32)
    scoring = ScoringOptions(memory_efficient=True)
    step = make_dpo_step(model=model, tx=tx, scoring=scoring, lora=lora_config)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch, reference).compile()
    count = sum(x.size for x in jax.tree.leaves(trained))
    return compiled.memory_analysis(), count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--compute_dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    config = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    setups = {
        "full DPO, frozen f32 reference": (None, jnp.float32),
        f"LoRA r={args.rank}, f32 base": (config, jnp.float32),
        f"LoRA r={args.rank}, bf16 base": (config, jnp.bfloat16),
    }
    print(
        f"{args.preset}: {args.pairs} pairs x 2 x {args.length} tokens, AdamW, scanned layers "
        f"with remat, memory-efficient log-probs, {args.compute_dtype} compute"
    )
    print("| setup | trained params | arguments GiB | temp GiB | total GiB |")
    print("|---|---:|---:|---:|---:|")
    for name, (lora_config, dtype) in setups.items():
        m, count = compiled_memory(args, lora_config, dtype)
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)  # fmt: skip
        print(f"| {name} | {count / 1e6:.1f}M | {m.argument_size_in_bytes / GIB:.2f} | "
              f"{m.temp_size_in_bytes / GIB:.2f} | {total / GIB:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
