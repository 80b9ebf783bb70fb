"""Compiled memory of value-and-grad of a masked log-prob sum: naive logits vs chunked.

Compiles (never runs) `jax.value_and_grad(loss, argnums=(hidden, unembed))` for
  naive:     token_logps(hidden @ unembed, tokens)            materialises [B, L, V]
  efficient: token_logps_from_features(hidden, unembed, ...)  sequence x vocab chunks
and prints XLA's buffer-assignment statistics (`compiled.memory_analysis()`): temp bytes
(scratch buffers, i.e. what the log-prob path adds), argument and output bytes, and
total = arguments + outputs + temp - aliased, an upper bound of the footprint (XLA:CPU's
`peak_memory_in_bytes` counts only arguments and outputs, so it is not shown). Inputs
are `jax.ShapeDtypeStruct`s: nothing is allocated, any size compiles on a laptop.

    python experiments/logprobs_memory/measure.py            # the main table in README.md
    python experiments/logprobs_memory/measure.py --batch 8 --length 4096 --dtype float32
"""

import argparse
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dpo_jax import logprobs  # noqa: E402

GIB = 1024**3


def compiled_memory(batch, length, width, vocab, dtype, chunk_size, vocab_chunk_size):
    """Returns {"naive": stats, "efficient": stats} for one configuration."""
    hidden = jax.ShapeDtypeStruct((batch, length, width), dtype)
    unembed = jax.ShapeDtypeStruct((width, vocab), dtype)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    loss_mask = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def naive(hidden, unembed, tokens, loss_mask):
        logits = jnp.einsum("bld,dv->blv", hidden, unembed)
        return logprobs.masked_sum(logprobs.token_logps(logits, tokens), loss_mask).sum()

    def efficient(hidden, unembed, tokens, loss_mask):
        logps = logprobs.token_logps_from_features(
            hidden, unembed, tokens, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
        )
        return logprobs.masked_sum(logps, loss_mask).sum()

    stats = {}
    for name, loss in (("naive", naive), ("efficient", efficient)):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        compiled = step.lower(hidden, unembed, tokens, loss_mask).compile()
        stats[name] = compiled.memory_analysis()
        # XLA:CPU has no bfloat16 matmul: it inserts a float32 copy of bfloat16 operands
        # (here the [D, V] unembed), which GPU/TPU do not need. Flag it in the table.
        upcast = rf"= f32\[{width},{vocab}\]\{{[^}}]*\}} convert\("
        stats[name + "_upcasts_unembed"] = bool(re.search(upcast, compiled.as_text()))
    return stats


def total(stats):
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--length", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument(
        "--vocab_chunk_size", type=int, default=8192, help="0 = whole vocabulary (None)"
    )
    args = parser.parse_args()
    args.vocab_chunk_size = args.vocab_chunk_size or None

    print(f"backend: {jax.default_backend()}, jax {jax.__version__}")
    print(
        f"D={args.width} V={args.vocab} chunk_size={args.chunk_size} "
        f"vocab_chunk_size={args.vocab_chunk_size}"
    )
    print(
        "| B | L | dtype | naive temp GiB | efficient temp GiB | temp ratio "
        "| naive total GiB | efficient total GiB | args GiB | outputs GiB "
        "| f32 copy of unembed (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for length in args.length:
            for dtype in args.dtype:
                stats = compiled_memory(
                    batch,
                    length,
                    args.width,
                    args.vocab,
                    jnp.dtype(dtype),
                    args.chunk_size,
                    args.vocab_chunk_size,
                )
                naive, eff = stats["naive"], stats["efficient"]
                print(
                    f"| {batch} | {length} | {dtype} "
                    f"| {naive.temp_size_in_bytes / GIB:.3f} "
                    f"| {eff.temp_size_in_bytes / GIB:.3f} "
                    f"| {naive.temp_size_in_bytes / eff.temp_size_in_bytes:.1f}x "
                    f"| {total(naive) / GIB:.3f} "
                    f"| {total(eff) / GIB:.3f} "
                    f"| {eff.argument_size_in_bytes / GIB:.3f} "
                    f"| {eff.output_size_in_bytes / GIB:.3f} "
                    f"| {'yes' if stats['efficient_upcasts_unembed'] else 'no'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
