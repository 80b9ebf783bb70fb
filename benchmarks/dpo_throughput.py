"""DPO training throughput: dpo_jax vs TRL's DPOTrainer on pairs of varying length, one run.

Every system trains the SAME random-init Llama (a transformers model saved with
`save_pretrained`; dpo_jax loads it with `dpo_jax.models.from_hf`, TRL with
`from_pretrained`: identical float32 weights, the reference = the initial policy) on the
SAME token ids (a seeded stream of pairs: prompt, chosen and rejected lengths drawn
uniformly, responses ending with EOS), with the same objective: sigmoid DPO (beta 0.1),
AdamW, global-norm clipping at 1.0. The systems:

  ours   padded  params   `make_dpo_step` jitted, padded [B, 2, L] batches of the training
  ours   padded  cached     pipeline (`dpo_jax.data.pipeline`, L a multiple of 64), the
  ours   packed  params     reference as frozen params or as cached log-prob sums (scored
  ours   packed  cached     once, `scoring.pair_logps`); packed: R rows of 768 tokens;
  ours   packed_shared ...  packed_shared (prompt sharing): rows of 2 x 384 tokens, each
                            holding whole pairs, the prompt once (`data.shared_prompts`)
  trl    padded  params   `trl.DPOTrainer` defaults (a reference model in the step)
  trl    padded  cached   `precompute_ref_log_probs=True`

Each system lives in its own process (its peak RSS is its own) and is set up one after
the other, ending with one untimed step (batch 0). Then rounds interleave them (the order
rotates each round); round k times each system on the same next batches of the stream,
and a 2048^2 matmul in the compute dtype is timed in the parent at its start: the peak the
MFU column divides by (median over rounds). See benchmarks/README.md for the results.

    python benchmarks/dpo_throughput.py              # issue 12's workload, ~25 min here
    python benchmarks/dpo_throughput.py --quick      # 1 round of 1 step: a smoke run
    python benchmarks/dpo_throughput.py --json       # also one JSON line per system
    python benchmarks/dpo_throughput.py --dtype=bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed; this is a CPU benchmark
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAD, BOS, EOS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Workload:
    """The fixed workload of issue 12 (keep it fixed so that results compare across versions)."""

    vocab: int = 32000
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    prompt_lengths: tuple[int, int] = (32, 128)  # uniform, inclusive
    response_lengths: tuple[int, int] = (32, 256)  # chosen and rejected each; incl. EOS
    pairs_per_step: int = 8
    max_length: int = 384
    beta: float = 0.1
    learning_rate: float = 1e-6
    seed: int = 0
    dtype: str = "float32"  # compute dtype; params, optimizer and log-softmax stay float32
    pad_to_multiple_of: int = 64  # padded layout: the training default (config.data)
    pack_rows: int = 5  # packed layout: R rows of pack_row_length per step
    pack_row_length: int = 768
    # packed_shared layout: R rows of 2 * max_length; 4 rows hold 7.9 pairs per step on
    # average on this workload (packed: 5 rows of 768), as every pair needs fewer tokens.
    shared_rows: int = 4
    memory_efficient: bool = True  # chunked log-probs from hidden states (no [N, L, V])
    # ... with the head only at positions whose next token is scored, dealt evenly over the
    # rows of the batch (one device: one row group) in chunks of 64 positions.
    scored_only: bool = True
    # Ours: the attention kernel (`ModelConfig.attention`): "blocked" visits only the blocks
    # the segment mask leaves visible (padding, packing and prompt sharing); "xla" is the
    # einsum over full [L, L] scores. The same values and gradients.
    attention: str = "blocked"
    logps_chunk_size: int = 64
    # ... and keeps the chunks' float32 logits for the backward pass rather than recomputing
    # them (one of the head's four matmuls fewer; ~0.3 GB more here).
    keep_logits: bool = True


@dataclasses.dataclass(frozen=True)
class System:
    framework: str  # "ours" | "trl"
    layout: str  # "padded" | "packed" | "packed_shared"
    reference: str  # "params" (a reference forward in each step) | "cached"

    @property
    def name(self) -> str:
        return f"{self.framework} {self.layout} {self.reference}"


OUR_LAYOUTS = ("padded", "packed", "packed_shared")
SYSTEMS = tuple(
    [System("ours", layout, ref) for layout in OUR_LAYOUTS for ref in ("params", "cached")]
    + [System("trl", "padded", "params"), System("trl", "padded", "cached")]
)

# ------------------------------------------------------------------------------------------
# The shared model, data and FLOP count
# ------------------------------------------------------------------------------------------


def save_model(w: Workload, directory: str) -> int:
    """Saves the seeded random-init transformers Llama; returns its parameter count."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads,
        max_position_embeddings=2 * w.pack_row_length,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(w.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def sample_pairs(w: Workload, n: int) -> list[tuple[list[int], list[int], list[int]]]:
    """n seeded (prompt, chosen, rejected) id lists; responses end with EOS, ids >= 3."""
    rng = np.random.default_rng(w.seed)

    def ids(lengths, eos):
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        return rng.integers(3, w.vocab, n - eos).tolist() + [EOS] * eos

    return [
        (ids(w.prompt_lengths, 0), ids(w.response_lengths, 1), ids(w.response_lengths, 1))
        for _ in range(n)
    ]


@functools.cache
def _model_config(model_dir: str, dtype: str):
    from dpo_jax.models.hf_config import config_from_hf

    with open(os.path.join(model_dir, "config.json")) as f:
        return config_from_hf(json.load(f), where=model_dir, dtype=dtype)


def step_counts(model_dir: str, w: Workload, pairs, steps: int, reference: str) -> list[dict]:
    """What each of `steps` consecutive steps of B pairs processes: pairs, real tokens
    (prompt counted with each response) and DPO model FLOPs (`dpo_jax.train.throughput`:
    policy forward + backward on prompt + chosen and prompt + rejected, plus the reference
    forward when it runs in the step). Computed here, not in TRL's process, whose peak
    RSS should not include JAX."""
    from dpo_jax.train.throughput import train_flops

    config, B, out = _model_config(model_dir, w.dtype), w.pairs_per_step, []
    for i in range(0, steps * B, B):
        lengths = [len(p) + len(r) for p, c, rj in pairs[i : i + B] for r in (c, rj)]
        flops = train_flops(config, lengths) * (4 / 3 if reference == "params" else 1.0)
        out.append({"pairs": B, "tokens": sum(lengths), "flops": flops})
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------
# Ours: the public API (pipeline batches, make_dpo_step, jit)
# ------------------------------------------------------------------------------------------


class Ours:
    """`make_dpo_step` on the pipeline's batches of the pair stream, one CPU device.

    Setup (excluded from the step times, reported): loading, scoring the reference once
    (cached), building the batches of one round and putting them on the device, and
    compiling the step once per batch shape (`lower` + `compile`).
    """

    def __init__(self, system: System, w: Workload, model_dir: str, pairs, steps: int):
        import jax

        from dpo_jax.data.examples import TokenizedPair
        from dpo_jax.data.pipeline import IteratorSpec, make_preference_iterator
        from dpo_jax.models import from_hf
        from dpo_jax.train.optimizers import make_optimizer
        from dpo_jax.train.scoring import ScoringOptions, pair_logps
        from dpo_jax.train.state import state_from_params
        from dpo_jax.train.steps import Objective, make_dpo_step
        from dpo_jax.train.throughput import step_flops

        t0 = time.perf_counter()
        self.jax = jax
        model, params = from_hf(model_dir, dtype=w.dtype, attention=w.attention)
        scoring = ScoringOptions(
            memory_efficient=w.memory_efficient,
            chunk_size=w.logps_chunk_size,
            scored_only=w.scored_only,
            scored_row_groups=1,
            keep_logits=w.keep_logits,
        )
        tokenized = [TokenizedPair(p, c, r) for p, c, r in pairs]
        ref_logps = None
        self.reference = jax.device_put(params)
        if system.reference == "cached":  # scored once by the initial params, then dropped
            score = jax.jit(functools.partial(pair_logps, model=model, options=scoring))
            ref_logps = np.zeros((len(pairs), 2), np.float32)
            B = w.pairs_per_step
            for i in range(0, len(pairs), B):
                chunk = tokenized[i : i + B]
                scored = score(self.reference, _pad(chunk, w, batch_size=B))
                ref_logps[i : i + B] = np.asarray(scored)[: len(chunk)]
            self.reference = None
        packed = system.layout == "packed"
        num_rows = {"packed": w.pack_rows, "packed_shared": w.shared_rows}.get(system.layout)
        spec = IteratorSpec(
            batch_size=w.pairs_per_step,
            max_length=w.pack_row_length if packed else w.max_length,  # shared: rows of 2x
            pad_id=PAD,
            shuffle=False,
            num_epochs=None,
            shard_index=0,
            shard_count=1,
            layout=system.layout,
            pad_to_multiple_of=w.pad_to_multiple_of if system.layout == "padded" else None,
            num_rows=num_rows,
        )
        iterator = make_preference_iterator(tokenized, spec, ref_logps=ref_logps)
        host = [next(iterator) for _ in range(steps)]
        iterator.close()
        config = _model_config(model_dir, w.dtype)
        self.counts = [
            {
                "pairs": int(b["pair_mask"].sum()),
                "tokens": int(np.count_nonzero(b["segment_ids"])),
                "pair_tokens": pair_tokens(b),
                "slots": int(b["segment_ids"].size),
                "flops": step_flops(
                    config, b, stage="dpo", reference_forward=system.reference == "params"
                ),
            }
            for b in host
        ]
        self.batches = [jax.device_put(b) for b in host]
        tx = make_optimizer(
            {
                "name": "adamw",
                "learning_rate": w.learning_rate,
                "warmup_steps": 0,
                "max_grad_norm": 1.0,
                "weight_decay": 0.0,
            }  # fmt: skip
        )
        self.state = state_from_params(jax.device_put(params), tx, jax.random.key(w.seed))
        del params
        step = make_dpo_step(
            model=model, tx=tx, objective=Objective.create("sigmoid", w.beta), scoring=scoring
        )
        self.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jitted = jax.jit(step, donate_argnums=0)
        self.compiled = {}
        for b in self.batches:
            shape = _shapes(b)
            if shape not in self.compiled:
                self.compiled[shape] = jitted.lower(self.state, b, self.reference).compile()
        self.compile_s = time.perf_counter() - t0

    def run(self, first: int, count: int) -> list[dict]:
        """Steps on batches first, ..., first + count - 1: per step, seconds and what it
        processed."""
        out = []
        for k in range(first, first + count):
            batch = self.batches[k]
            t = time.perf_counter()
            self.state, metrics = self.compiled[_shapes(batch)](self.state, batch, self.reference)
            self.jax.block_until_ready((self.state, metrics))
            out.append({"seconds": time.perf_counter() - t, **self.counts[k]})
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError("ours: non-finite loss")
        return out

    def info(self) -> dict:
        return {"setup_s": self.load_s, "compile_s": self.compile_s, "shapes": len(self.compiled)}


def pair_tokens(batch) -> int:
    """Tokens of a batch's pairs as separate sequences (prompt + chosen, prompt + rejected):
    its real tokens, plus, with prompt sharing, each shared prompt once more per response
    beyond the first that reads it (T - 1 tokens per pair: the shared segment's length)."""
    seg = batch["segment_ids"]
    n = int(np.count_nonzero(seg))
    if "prefix_segment_ids" in batch:
        for row_seg, row_prefix in zip(seg, batch["prefix_segment_ids"], strict=True):
            readers = np.unique(row_seg[row_prefix != 0])  # responses that read a prompt
            prompts = np.array([row_prefix[row_seg == s][0] for s in readers], np.int64)
            for prompt, count in zip(*np.unique(prompts, return_counts=True), strict=True):
                n += (int(count) - 1) * int(np.count_nonzero(row_seg == prompt))
    return n


def _pad(tokenized, w: Workload, batch_size: int):
    from dpo_jax.data.batching import pad_pairs

    return pad_pairs(tokenized, max_length=w.max_length, pad_id=PAD, batch_size=batch_size)


def _shapes(batch) -> tuple:
    return tuple(sorted((k, v.shape) for k, v in batch.items()))


# ------------------------------------------------------------------------------------------
# TRL: the real DPOTrainer on the same token ids
# ------------------------------------------------------------------------------------------


def word_tokenizer(vocab: int):
    """A word-level tokenizer in which the text "w5 w9" is exactly ids [5, 9], so that TRL's
    text pipeline rebuilds the token ids dpo_jax gets directly (ids 0-2: pad, bos, eos)."""
    import tokenizers
    import transformers

    words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _text(ids) -> str:
    return " ".join("</s>" if i == EOS else f"w{i}" for i in ids)


class Trl:
    """`trl.DPOTrainer`, built once (so `precompute_ref_log_probs` scores the initial
    policy, once), `train()` once per round on that round's batches of the stream, in
    stream order (`train_sampling_strategy="sequential"`). A callback times `on_step_begin` ->
    `on_step_end` (forward, backward, clipping, optimizer step); fetching and collating the
    batch come before it, as ours has its batches on the device before timing. `--dtype
    bfloat16`: `bf16=True` (torch autocast on CPU, float32 master weights)."""

    def __init__(self, system: System, w: Workload, model_dir: str, pairs, counts, workdir):
        import datasets
        import torch
        import transformers
        import trl

        t0 = time.perf_counter()
        tokenizer = word_tokenizer(w.vocab)
        for p, c, _ in pairs[:2]:
            assert tokenizer(_text(p) + " " + _text(c))["input_ids"] == p + c
        B, steps = w.pairs_per_step, len(counts)
        pairs = pairs[: steps * B]
        dataset = datasets.Dataset.from_dict(
            {
                "prompt": [_text(p) for p, _, _ in pairs],
                "chosen": [" " + _text(c) for _, c, _ in pairs],
                "rejected": [" " + _text(r) for _, _, r in pairs],
            }
        )
        precompute = system.reference == "cached"
        config = trl.DPOConfig(
            output_dir=os.path.join(workdir, f"trl_{system.reference}"),
            per_device_train_batch_size=B,
            max_steps=steps,
            learning_rate=w.learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=w.beta,
            loss_type=["sigmoid"],
            max_length=w.max_length,
            precompute_ref_log_probs=precompute,
            train_sampling_strategy="sequential",
            use_cpu=True,
            bf16=w.dtype == "bfloat16",
            fp16=False,
            gradient_checkpointing=False,
            report_to=[],
            logging_steps=10**6,
            save_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=w.seed,
        )

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

        self.timer = _timer_callback()
        self.trainer = trl.DPOTrainer(
            model=load(),
            ref_model=None if precompute else load(),  # precompute: TRL scores, keeps none
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[self.timer],
        )
        self.trainer.remove_callback(transformers.PrinterCallback)  # stdout: the report only
        self.shapes = []
        collate = self.trainer.data_collator

        def recording_collator(features):
            batch = collate(features)
            self.shapes.append(
                (int(batch["input_ids"].numel()), int(batch["attention_mask"].sum()))
            )
            return batch

        self.trainer.data_collator = recording_collator
        self.counts = counts
        self.dataset = self.trainer.train_dataset  # tokenized (+ reference log-probs)
        self.setup_s = time.perf_counter() - t0

    def run(self, first: int, count: int) -> list[dict]:
        """`train()` on batches first, ..., first + count - 1 (optimizer state carried)."""
        B = self.trainer.args.per_device_train_batch_size
        self.timer.times.clear()
        self.shapes.clear()
        self.trainer.train_dataset = self.dataset.select(range(first * B, (first + count) * B))
        self.trainer.args.max_steps = count
        self.trainer.train()
        opt = self.trainer.optimizer.optimizer
        self.optimizer = f"{type(opt).__name__}(fused={opt.defaults.get('fused')})"
        out = []
        for i in range(count):
            slots, tokens = self.shapes[i]
            counts = self.counts[first + i]
            assert tokens == counts["tokens"], "TRL's batch is not the pairs we counted"
            out.append({"seconds": self.timer.times[i], **counts, "slots": slots})
        return out

    def info(self) -> dict:
        return {"setup_s": self.setup_s, "compile_s": 0.0, "optimizer": self.optimizer}


def _timer_callback():
    import transformers

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    return Timer()


# ------------------------------------------------------------------------------------------
# One process per system
# ------------------------------------------------------------------------------------------


def build(system: System, w: Workload, model_dir: str, pairs, steps, workdir: str):
    """steps: the number of batches (ours), or TRL's `step_counts`."""
    if system.framework == "ours":
        return Ours(system, w, model_dir, pairs, steps)
    return Trl(system, w, model_dir, pairs, steps, workdir)


def worker(conn, system, w, model_dir, pairs, steps, workdir):
    """Serves ("setup",) once (ending with one untimed step on batch 0: lazy allocations,
    optimizer state), ("round", first, count) per round, ("finish",) last."""
    rss_start = rss_mib()
    impl = None
    try:
        while True:
            command = conn.recv()
            if command[0] == "setup":
                impl = build(system, w, model_dir, pairs, steps, workdir)
                impl.run(0, 1)
                conn.send({"rss_start_mib": rss_start, "rss_setup_mib": rss_mib()})
            elif command[0] == "round":
                conn.send(impl.run(command[1], command[2]))
            else:
                conn.send({**impl.info(), "peak_rss_mib": peak_rss_mib()})
                return
    except Exception as err:  # noqa: BLE001 - reported by the parent, which stops the run
        import traceback

        conn.send({"error": f"{system.name}: {err!r}\n{traceback.format_exc()}"})


class Remote:
    def __init__(self, ctx, system, *args):
        self.system = system
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(child, system, *args), daemon=True)
        self.process.start()

    def call(self, *command):
        self.conn.send(command)
        reply = self.conn.recv()
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(reply["error"])
        return reply


def matmul_flops(dtype: str) -> float:
    """A 2048^2 matmul in `dtype`, best of 5 (not cached: measured again each round)."""
    from dpo_jax.train.throughput import measured_matmul_flops

    return measured_matmul_flops.__wrapped__(dtype, size=2048, reps=5)


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def summarize(steps: list[list[dict]], peak: float, pair_tokens: list[float]) -> dict:
    """Rates of one system from its rounds' timed steps (medians over rounds of each
    round's totals).

    pairs_per_s: per round, pair tokens/s / pair_tokens[round], the mean real tokens of
    the pairs that round's batches of the stream hold (those TRL and the padded layout
    process): the packer takes the largest pairs of its buffer first, so over a few steps
    its pairs are larger than the stream's mean (measured_pairs_per_s counts them as they
    come). Equal to the measured rate for systems that process exactly those pairs.
    Pair tokens count each pair as its two sequences (a step's "pair_tokens", default its
    "tokens"), so a shared prompt counts twice there, once in tokens_per_s.
    """

    def per_round(f):
        return statistics.median(f(r) for r in steps)

    def total(r, k):
        return sum(s[k] for s in r)

    def whole(k):
        return sum(total(r, k) for r in steps)

    def pair_total(r):
        return sum(s.get("pair_tokens", s["tokens"]) for s in r)

    tokens_per_s = [total(r, "tokens") / total(r, "seconds") for r in steps]
    pair_tokens_per_s = [pair_total(r) / total(r, "seconds") for r in steps]
    flops_per_s = per_round(lambda r: total(r, "flops") / total(r, "seconds"))
    flops_per_pair_token = sum(total(r, "flops") for r in steps) / sum(map(pair_total, steps))
    return {
        "pairs_per_s": statistics.median(np.divide(pair_tokens_per_s, pair_tokens)),
        "measured_pairs_per_s": per_round(lambda r: total(r, "pairs") / total(r, "seconds")),
        "tokens_per_s": statistics.median(tokens_per_s),
        "step_s": statistics.median(s["seconds"] for r in steps for s in r),
        "padding_fraction": 1 - whole("tokens") / whole("slots"),
        "gflop_per_pair": flops_per_pair_token * np.mean(pair_tokens) / 1e9,
        "gflop_per_s": flops_per_s / 1e9,
        "mfu": flops_per_s / peak,
        "per_round_pairs_per_s": np.divide(pair_tokens_per_s, pair_tokens).tolist(),
    }


def _ratio(row, rows, reference: str) -> str:
    """row's pairs/s over TRL's (with that reference mode) in the same run, or "-"."""
    trl = [r for r in rows if r["system"] == "trl" and r["reference"] == reference]
    return f"{row['pairs_per_s'] / trl[0]['pairs_per_s']:.2f}x" if trl else "-"


def table(rows: list[dict]) -> str:
    lines = [
        "| system | layout | reference | pairs/s | measured pairs/s | tokens/s | padding "
        "| GFLOP/pair | GFLOP/s | MFU | x TRL default | x TRL precomputed | setup s | compile s "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['layout']} | {r['reference']} | {r['pairs_per_s']:.3f} | "
            f"{r['measured_pairs_per_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['padding_fraction']:.1f}% | {r['gflop_per_pair']:.1f} | "
            f"{r['gflop_per_s']:.1f} | {100 * r['mfu']:.1f}% | "
            f"{_ratio(r, rows, 'params')} | {_ratio(r, rows, 'cached')} | {r['setup_s']:.1f} | "
            f"{r['compile_s']:.1f} | {r['peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per system")
    p.add_argument("--steps", type=int, default=1, help="timed steps per round and system")
    p.add_argument("--quick", action="store_true", help="1 round of 1 step: a smoke run")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", action="store_true", help="also print one JSON line per system")
    p.add_argument(
        "--systems",
        default="all",
        help="comma-separated subset of 'framework layout reference' names, e.g. "
        "'ours packed cached,trl padded params' (the table's ratios need both TRL rows)",
    )
    p.add_argument("--full-logits", action="store_true", help="ours: [N, L, V] logits path")
    p.add_argument("--all-positions", action="store_true", help="ours: the head at every position")
    p.add_argument(
        "--recompute-logits",
        action="store_true",
        help="ours: recompute the head's logits in the backward pass (do not keep them)",
    )
    p.add_argument(
        "--attention",
        choices=("blocked", "xla"),
        default="blocked",
        help="ours: attention kernel (blocked skips the masked blocks; xla: full [L, L])",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    return args


def main(argv=None, workload: Workload | None = None):
    """Runs the benchmark and prints its report; returns the rows. `workload`: another
    than issue 12's (smoke tests); --dtype, --full-logits, --all-positions,
    --recompute-logits and --attention still apply."""
    args = parse_args(argv)
    w = dataclasses.replace(
        workload or Workload(),
        dtype=args.dtype,
        memory_efficient=not args.full_logits,
        scored_only=not args.all_positions,
        keep_logits=not args.recompute_logits,
        attention=args.attention,
    )
    systems = SYSTEMS
    if args.systems != "all":
        wanted = {s.strip() for s in args.systems.split(",")}
        systems = tuple(s for s in SYSTEMS if s.name in wanted)
        unknown = wanted - {s.name for s in systems}
        if unknown:
            raise SystemExit(
                f"--systems: unknown {sorted(unknown)}; known {[s.name for s in SYSTEMS]}"
            )
    # Batch 0 warms each system up; round k runs batches 1 + k * steps, ...: every round
    # new pairs, the same ones for every system.
    steps = 1 + args.rounds * args.steps
    # The packer sees up to 2 B pairs ahead of what it packs (its buffer).
    pairs = sample_pairs(w, (steps + 2) * w.pairs_per_step)
    ctx = multiprocessing.get_context("spawn")
    t_start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = os.path.join(workdir, "model")
        n_params = save_model(w, model_dir)
        remotes = [
            Remote(ctx, s, w, model_dir, pairs, steps if s.framework == "ours"
                   else step_counts(model_dir, w, pairs, steps, s.reference), workdir)
            for s in systems
        ]  # fmt: skip
        setup = {}
        for r in remotes:  # one at a time: compile and load times without contention
            setup[r.system] = r.call("setup")
            print(f"set up {r.system.name}: {setup[r.system]}", flush=True)
        timed = {s: [] for s in systems}
        peaks = []
        for k in range(args.rounds):
            peaks.append(matmul_flops(args.dtype))
            order = remotes[k % len(remotes) :] + remotes[: k % len(remotes)]
            for r in order:
                timed[r.system].append(r.call("round", 1 + k * args.steps, args.steps))
                pairs_s = sum(s["pairs"] for s in timed[r.system][-1]) / sum(
                    s["seconds"] for s in timed[r.system][-1]
                )
                print(f"round {k}: {r.system.name}: {pairs_s:.3f} pairs/s", flush=True)
            print(f"round {k}: {args.dtype} matmul {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
        finish = {r.system: r.call("finish") for r in remotes}
        for r in remotes:
            r.process.join(timeout=60)
    peak = statistics.median(peaks)
    B, pair_tokens = w.pairs_per_step, []
    for k in range(args.rounds):  # the pairs of round k's batches of the stream
        stream = pairs[(1 + k * args.steps) * B : (1 + (k + 1) * args.steps) * B]
        pair_tokens.append(statistics.mean(2 * len(p) + len(c) + len(r) for p, c, r in stream))
    rows = []
    for s in systems:
        rows.append(
            {
                "system": s.framework,
                "layout": s.layout,
                "reference": s.reference,
                "dtype": args.dtype,
                "attention": w.attention if s.framework == "ours" else "transformers default",
                "head": _head(w) if s.framework == "ours" else "trl fused (completion positions)",
                **summarize(timed[s], peak, pair_tokens),
                **finish[s],
                **setup[s],
                "peak_gflop_per_s": peak / 1e9,
            }
        )
    _print_report(args, w, rows, peaks, n_params, time.time() - t_start)
    return rows


def _head(w: Workload) -> str:
    """Ours: how the log-probs' [D, V] head ran (for the JSON lines)."""
    if not w.memory_efficient:
        return "full logits"
    where = "scored positions" if w.scored_only else "every position"
    return f"{where}, logits {'kept' if w.keep_logits else 'recomputed'}"


def _print_report(args, w, rows, peaks, n_params, wall):
    import jax
    import torch
    import transformers
    import trl

    print()
    print(
        f"workload: Llama vocab {w.vocab}, hidden {w.hidden}, MLP {w.intermediate}, "
        f"{w.layers} layers, {w.heads} heads / {w.kv_heads} kv, untied, {n_params / 1e6:.1f}M "
        f"params, {args.dtype} compute; prompt U{list(w.prompt_lengths)}, chosen/rejected "
        f"U{list(w.response_lengths)}, {w.pairs_per_step} pairs/step, max_length "
        f"{w.max_length}; sigmoid beta {w.beta}, AdamW lr {w.learning_rate}, clip 1.0; "
        f"ours: padded L multiple of {w.pad_to_multiple_of}, packed {w.pack_rows} x "
        f"{w.pack_row_length}, packed_shared {w.shared_rows} x {2 * w.max_length}, "
        f"memory_efficient log-probs {w.memory_efficient} (head only where scored: "
        f"{w.memory_efficient and w.scored_only})"
    )
    print(
        f"timing: 1 warm-up step, then {args.rounds} rounds x {args.steps} timed step(s), "
        f"interleaved; {wall / 60:.1f} min wall; {args.dtype} matmul peak per round (GFLOP/s): "
        f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)} (MFU divides by the median)"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end; jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, trl {trl.__version__}"
    )
    print()
    print(table(rows))
    for r in rows:
        per_round = ", ".join(f"{x:.3f}" for x in r["per_round_pairs_per_s"])
        print(f"per-round pairs/s, {r['system']} {r['layout']} {r['reference']}: {per_round}")
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))


if __name__ == "__main__":
    main()
