"""Compiled memory of the whole DPO training step, by log-prob path.

Compiles (never runs) the jitted DPO step of `dpo_jax.train.steps.make_dpo_step` with a
frozen reference, for a Llama-architecture model with a 32k vocabulary, under three
`ScoringOptions` (the config keys `dpo.memory_efficient_logps`, `dpo.logps_chunk_size`,
`dpo.logps_vocab_chunk_size`):
  logits:          memory_efficient_logps=False (full [2B, L, V] logits)
  chunked, whole V: memory_efficient_logps=True, logps_vocab_chunk_size=0 (the training
                   default before vocabulary blocks were wired in)
  chunked, blocked: memory_efficient_logps=True, logps_vocab_chunk_size=8192 (the default)
and prints XLA's buffer statistics (`compiled.memory_analysis()`): temp bytes (scratch) and
total = arguments + outputs + temp - aliased. Inputs are ShapeDtypeStructs: nothing is
allocated, so the full-size step compiles on a laptop CPU.

    python experiments/logprobs_memory/train_step.py
    python experiments/logprobs_memory/train_step.py --pairs 8 --length 1024
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dpo_jax.models import DecoderLM, ModelConfig  # noqa: E402
from dpo_jax.parallel import unbox  # noqa: E402
from dpo_jax.train.optimizers import make_optimizer  # noqa: E402
from dpo_jax.train.scoring import ScoringOptions  # noqa: E402
from dpo_jax.train.state import state_from_params  # noqa: E402
from dpo_jax.train.steps import make_dpo_step  # noqa: E402

GIB = 1024**3
VARIANTS = {
    "logits": ScoringOptions(memory_efficient=False),
    "chunked, whole V": ScoringOptions(memory_efficient=True, vocab_chunk_size=None),
    "chunked, blocked": ScoringOptions(memory_efficient=True, vocab_chunk_size=8192),
}


def model_config(args) -> ModelConfig:
    return ModelConfig.tiny(
        vocab_size=args.vocab, hidden_size=args.width, num_layers=args.layers,
        num_heads=args.width // 64, num_kv_heads=args.width // 128, head_dim=64,
        mlp_dim=int(args.width * 2.6875), max_position_embeddings=args.length,
        tie_embeddings=False,
    )  # fmt: skip


def compiled_memory(args, options: ScoringOptions):
    model = DecoderLM(model_config(args))
    tx = make_optimizer({"name": "adamw", "learning_rate": 1e-6, "warmup_steps": 0})
    tokens = jnp.zeros((1, args.length), jnp.int32)
    params = jax.eval_shape(lambda: unbox(model.init(jax.random.key(0), tokens)["params"]))
    state = jax.eval_shape(lambda p: state_from_params(p, tx, jax.random.key(0)), params)
    shape = (args.pairs, 2, args.length)
    batch = {f: jax.ShapeDtypeStruct(shape, jnp.int32)
             for f in ("tokens", "positions", "segment_ids", "loss_mask")}  # fmt: skip
    batch["pair_mask"] = jax.ShapeDtypeStruct((args.pairs,), jnp.int32)
    step = make_dpo_step(model=model, tx=tx, scoring=options)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch, params).compile()
    return compiled.memory_analysis()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    print(
        f"DPO step, frozen reference, AdamW: {args.pairs} pairs x 2 x {args.length} tokens, "
        f"vocab {args.vocab}, width {args.width}, {args.layers} layers, float32"
    )
    print("| log-prob path | temp GiB | total GiB |\n|---|---:|---:|")
    for name, options in VARIANTS.items():
        m = compiled_memory(args, options)
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        print(f"| {name} | {m.temp_size_in_bytes / GIB:.3f} | {total / GIB:.3f} |", flush=True)


if __name__ == "__main__":
    main()
