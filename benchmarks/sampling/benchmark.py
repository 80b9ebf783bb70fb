"""Greedy generation speed: dpo_jax.sampling.sample vs transformers `generate`, same run.

    python benchmarks/sampling/benchmark.py            # ~50M Llama and GPT-2, batch 1 and 16

For each model: random float32 weights in a DecoderLM, exported with `dpo_jax.models.to_hf`
and loaded by transformers (identical weights). Both generate `--new-tokens` tokens greedily
(no EOS) after the same random prompts of `--prompt-len` tokens. Reported per (model, batch):
steady-state wall time of one whole generation (prefill + all steps; median of `--reps`),
generated tokens/s, the ratio ours/transformers measured in the same run, our compile time
(first call minus a steady call), how often the greedy tokens agree, and the fraction of a
roofline bound achieved per decode step (max of weight+cache bytes / measured memory
bandwidth and 2 * params * batch FLOPs / measured matmul FLOP/s). See README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from dpo_jax import parallel
from dpo_jax.models import DecoderLM, ModelConfig, presets, to_hf
from dpo_jax.models.presets import count_params
from dpo_jax.sampling import sample

MODELS = {
    # 52.3M params: untied 32000 x 512 embedding and head + 6 layers of 3.2M.
    "llama": ModelConfig(
        family="llama",
        vocab_size=32000,
        hidden_size=512,
        num_layers=6,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=1408,
        norm_eps=1e-5,
        max_position_embeddings=2048,
    ),
    # 45.1M params: tied 50257 x 512 embedding + 6 layers of 3.1M (GPT-2 layout, width 512).
    "gpt2": presets.get(
        "gpt2",
        hidden_size=512,
        num_layers=6,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=2048,
    ),
}


def random_params(model: DecoderLM, seed: int, scale: float) -> dict:
    """Normal(0, scale) weights, norm scales 1 +- 0.1: peaked enough next-token
    distributions that greedy choices are not decided by rounding."""
    rng = np.random.default_rng(seed)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = parallel.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])

    def draw(path, x):
        noise = rng.standard_normal(size=x.shape, dtype=np.float32)
        return 1 + 0.1 * noise if path[-1].key == "scale" else scale * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def machine_bounds() -> tuple[float, float]:
    """(bytes/s of a large float32 copy counted as read + write, float32 matmul FLOP/s),
    measured with numpy on this machine, best of several tries."""
    a = np.ones(64 * 2**20 // 4, np.float32)  # 64 MiB, well past the L3 cache
    b = np.empty_like(a)
    copy = min(_time(lambda: np.copyto(b, a)) for _ in range(10))
    x = np.ones((1024, 1024), np.float32)
    matmul = min(_time(lambda: x @ x) for _ in range(5))
    return 2 * a.nbytes / copy, 2 * 1024**3 / matmul


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_ours(model, params, prompts, new_tokens, reps):
    def run():
        out = sample(model, params, prompts, rng=0, max_new_tokens=new_tokens, temperature=0.0)
        return out.tokens

    first = _time(run)
    times = [_time(run) for _ in range(reps)]
    return run(), statistics.median(times), first - statistics.median(times)


def bench_hf(hf_model, prompts, new_tokens, reps):
    input_ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )

    def run():
        with torch.no_grad():
            return hf_model.generate(input_ids, **kwargs)[:, input_ids.shape[1] :].numpy()

    run()  # warm-up (allocator, lazy init)
    times = [_time(run) for _ in range(reps)]
    return run(), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--init-scale", type=float, default=0.05)
    args = parser.parse_args()

    bandwidth, flops = machine_bounds()
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"float32 matmul {flops / 1e9:.1f} GFLOP/s"
    )
    header = (
        f"{'model':6} {'params':>7} {'B':>3} {'ours s':>7} {'hf s':>7} {'ours tok/s':>10} "
        f"{'hf tok/s':>9} {'speedup':>7} {'compile s':>9} {'agree':>6} {'bound %':>7}"
    )
    print(header)
    for name in args.models:
        config = MODELS[name]
        model = DecoderLM(config)
        n_params = count_params(config)
        params = random_params(model, seed=0, scale=args.init_scale)
        with tempfile.TemporaryDirectory() as tmp:
            to_hf(model, params, tmp)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32
            ).eval()
        params = jax.device_put(params)  # on the device once, like a trained policy
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            prompts = rng.integers(1, config.vocab_size, (batch, args.prompt_len))
            ours_tokens, ours_s, compile_s = bench_ours(
                model, params, prompts, args.new_tokens, args.reps
            )
            hf_tokens, hf_s = bench_hf(hf_model, prompts, args.new_tokens, args.reps)
            generated = batch * args.new_tokens
            agree = float(np.mean(ours_tokens == hf_tokens))
            # Roofline of one decode step at the mean cache length: read every weight (the
            # token embedding only B rows) and the K/V cache once; 2 FLOPs per weight per row.
            weights = n_params - (config.vocab_size - batch) * config.hidden_size * (
                not config.tie_embeddings
            )
            cache_len = args.prompt_len + args.new_tokens / 2
            kv = 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim
            step_bound = max(4 * (weights + kv) / bandwidth, 2 * weights * batch / flops)
            step_ours = ours_s / args.new_tokens
            print(
                f"{name:6} {n_params / 1e6:6.1f}M {batch:3d} {ours_s:7.3f} {hf_s:7.3f} "
                f"{generated / ours_s:10.1f} {generated / hf_s:9.1f} {hf_s / ours_s:6.2f}x "
                f"{compile_s:9.2f} {agree:6.1%} {100 * step_bound / step_ours:6.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
