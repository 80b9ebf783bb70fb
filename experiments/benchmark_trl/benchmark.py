"""DPO training-step time: dpo_jax vs TRL's DPOTrainer, same machine, same run.

Both frameworks train the SAME random-init model (a transformers config saved with
`save_pretrained`; dpo_jax loads it with `dpo_jax.models.from_hf`, so the float32 weights
are identical) on the SAME preference batches (B pairs, prompt P tokens, chosen/rejected
responses of R tokens incl. EOS, random token ids), with the same objective: one policy
forward+backward over the 2B chosen/rejected sequences, a frozen reference forward, the
sigmoid DPO loss (beta 0.1), global-norm clipping at 1.0 and an AdamW update (constant
learning rate, no weight decay).

- dpo_jax: `make_dpo_step` jitted with a donated state on one CPU device; the compile time
  (lower + compile) is reported separately and excluded from the step times.
- TRL: the real `trl.DPOTrainer` (`use_cpu=True`, float32, no gradient checkpointing),
  timed by a `TrainerCallback` from `on_step_begin` to `on_step_end`: forward, backward,
  clipping, optimizer and scheduler step of one optimizer update. Data loading and
  collation happen before `on_step_begin` and are excluded, as the dpo_jax timing
  excludes building its (already device-resident) batch.

The two are measured in interleaved rounds (dpo_jax round, TRL round, ...) so that load
from other processes on a shared machine hits both alike. Step time = median over the
steady-state steps of a round; the table reports the median over rounds, the p90 over all
steady-state steps, and the ratio TRL / dpo_jax (median of the per-round ratios).

    python experiments/benchmark_trl/benchmark.py            # defaults: see --help
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step (B)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32, help="incl. the EOS token")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per framework")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--memory-efficient",
        action="store_true",
        help="dpo_jax: chunked log-probs from features (default: full logits, like a plain "
        "forward); TRL always uses its fused lm-head log-probs",
    )
    return p.parse_args()


# ------------------------------------------------------------------------------------------
# The shared model, tokenizer and data
# ------------------------------------------------------------------------------------------


def hf_config(args):
    import transformers

    if args.model == "llama":
        return transformers.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=max(256, args.prompt_len + args.response_len),
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    return transformers.GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.heads,
        n_positions=max(256, args.prompt_len + args.response_len),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def word_tokenizer(vocab: int):
    """A word-level tokenizer in which text "w5 w9" is exactly the ids [5, 9]: lets TRL's
    text pipeline produce the same token ids that dpo_jax gets directly. Ids 0-2 are the
    pad / bos / eos specials."""
    import tokenizers
    import transformers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def random_pairs(args):
    """(prompt, chosen, rejected) id lists; responses end with EOS (id 2)."""
    rng = np.random.default_rng(args.seed)
    pairs = []
    for _ in range(args.batch):
        prompt = rng.integers(3, args.vocab, args.prompt_len).tolist()
        chosen = rng.integers(3, args.vocab, args.response_len - 1).tolist() + [2]
        rejected = rng.integers(3, args.vocab, args.response_len - 1).tolist() + [2]
        pairs.append((prompt, chosen, rejected))
    return pairs


def text(ids) -> str:
    return " ".join("</s>" if i == 2 else f"w{i}" for i in ids)


# ------------------------------------------------------------------------------------------
# dpo_jax
# ------------------------------------------------------------------------------------------


def jax_round_fn(args, model_dir, pairs):
    """Returns (compile_seconds, run_round(n_warmup, n_steps) -> list of step seconds)."""
    import jax

    from dpo_jax.data.batching import pad_pairs
    from dpo_jax.data.examples import TokenizedPair
    from dpo_jax.models import from_hf
    from dpo_jax.train.optimizers import make_optimizer
    from dpo_jax.train.scoring import ScoringOptions
    from dpo_jax.train.state import state_from_params
    from dpo_jax.train.steps import Objective, make_dpo_step

    model, params = from_hf(model_dir, dtype="float32")
    tx = make_optimizer(
        {
            "name": "adamw",
            "learning_rate": args.lr,
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "weight_decay": 0.0,
        }  # fmt: skip
    )
    reference = jax.device_put(params)
    state = state_from_params(jax.device_put(params), tx, jax.random.key(args.seed))
    tokenized = [TokenizedPair(p, c, r) for p, c, r in pairs]
    batch = pad_pairs(tokenized, max_length=args.prompt_len + args.response_len)
    assert batch["tokens"].shape == (args.batch, 2, args.prompt_len + args.response_len)
    batch = jax.device_put(batch)
    step = make_dpo_step(
        model=model,
        tx=tx,
        objective=Objective.create("sigmoid", args.beta),
        scoring=ScoringOptions(memory_efficient=args.memory_efficient),
    )
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch, reference).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run_round(n_warmup, n_steps):
        times = []
        for i in range(n_warmup + n_steps):
            t = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], batch, reference)
            jax.block_until_ready((holder["state"], metrics))
            if i >= n_warmup:
                times.append(time.perf_counter() - t)
        holder["loss"] = float(metrics["loss"])
        return times

    return compile_s, run_round, holder


# ------------------------------------------------------------------------------------------
# TRL
# ------------------------------------------------------------------------------------------


def trl_round_fn(args, model_dir, pairs, workdir):
    import datasets
    import torch
    import transformers
    import trl

    tokenizer = word_tokenizer(args.vocab)
    for prompt, chosen, _ in pairs[:1]:  # the text round-trips to exactly our ids
        assert tokenizer(text(prompt))["input_ids"] == prompt
        assert tokenizer(text(prompt + chosen))["input_ids"] == prompt + chosen
    # TRL appends eos_token to responses not ending with it; ours already do.
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [text(p) for p, _, _ in pairs],
            "chosen": [" " + text(c) for _, c, _ in pairs],
            "rejected": [" " + text(r) for _, _, r in pairs],
        }
    )

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    def run_round(n_warmup, n_steps):
        config = trl.DPOConfig(
            output_dir=os.path.join(workdir, "trl"),
            per_device_train_batch_size=args.batch,
            max_steps=n_warmup + n_steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=args.beta,
            loss_type=["sigmoid"],
            max_length=args.prompt_len + args.response_len,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            report_to=[],
            logging_steps=10**6,
            save_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=args.seed,
        )
        timer = Timer()
        trainer = trl.DPOTrainer(
            model=holder["model"],
            ref_model=holder["ref_model"],
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
        holder["optimizer"] = type(trainer.optimizer.optimizer).__name__
        opt = trainer.optimizer.optimizer
        holder["optimizer_defaults"] = {
            "fused": opt.defaults.get("fused"),
            "weight_decay": sorted({g["weight_decay"] for g in opt.param_groups}),
            "lr": sorted({g["lr"] for g in opt.param_groups}),
        }
        return timer.times[n_warmup:]

    holder = {
        "model": transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        "ref_model": transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32
        ),
    }
    return run_round, holder


def torch_round_fn(args, model_dir, pairs):
    """TRL's per-step math in plain torch, without the Trainer: one concatenated forward
    over [chosen; rejected], per-token log-probs of the response tokens
    (`trl.trainer.utils.selective_log_softmax` on the full logits), sums, a no-grad
    reference forward, the sigmoid loss, `clip_grad_norm_(1.0)` and fused `torch.optim.AdamW`
    (what the Trainer picked, see the TRL row). A lower bound for a torch DPO step."""
    import torch
    import torch.nn.functional as F
    import transformers
    from trl.trainer.utils import selective_log_softmax

    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy.train()
    reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    input_ids = torch.tensor([p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs])
    mask = torch.tensor(
        [[0] * len(p) + [1] * len(c) for p, c, _ in pairs]
        + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    )[:, 1:].float()
    targets = input_ids[:, 1:]

    def sequence_logps(model):
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        return (selective_log_softmax(logits, targets) * mask).sum(-1).chunk(2)

    def run_round(n_warmup, n_steps):
        times = []
        for i in range(n_warmup + n_steps):
            t = time.perf_counter()
            chosen_logps, rejected_logps = sequence_logps(policy)
            with torch.no_grad():
                ref_chosen_logps, ref_rejected_logps = sequence_logps(reference)
            logits = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
            loss = -F.logsigmoid(args.beta * logits).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            if i >= n_warmup:
                times.append(time.perf_counter() - t)
        return times

    return run_round


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def p90(xs):
    return float(np.percentile(xs, 90))


def main():
    args = parse_args()
    import jax
    import torch
    import transformers
    import trl

    tokens_per_step = args.batch * 2 * (args.prompt_len + args.response_len)
    pairs = random_pairs(args)
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = os.path.join(workdir, "model")
        torch.manual_seed(args.seed)
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config(args))
        hf_model.save_pretrained(model_dir)
        n_params = sum(p.numel() for p in hf_model.parameters())
        del hf_model

        compile_s, jax_round, jax_holder = jax_round_fn(args, model_dir, pairs)
        trl_round, trl_holder = trl_round_fn(args, model_dir, pairs, workdir)
        torch_round = torch_round_fn(args, model_dir, pairs)
        rounds = []
        for r in range(args.rounds):
            jt = jax_round(args.warmup, args.steps)
            tt = trl_round(args.warmup, args.steps)
            pt = torch_round(args.warmup, args.steps)
            rounds.append((jt, tt, pt))
            print(
                f"round {r}: dpo_jax median {statistics.median(jt) * 1e3:.1f} ms, "
                f"TRL median {statistics.median(tt) * 1e3:.1f} ms, "
                f"plain torch median {statistics.median(pt) * 1e3:.1f} ms",
                flush=True,
            )

    names = ("dpo_jax (jit)", "TRL DPOTrainer", "plain torch (TRL math)")
    medians = [statistics.median(statistics.median(r[k]) for r in rounds) for k in range(3)]
    p90s = [p90([t for r in rounds for t in r[k]]) for k in range(3)]
    # ratio of each baseline to dpo_jax, median over rounds
    ratios = [
        statistics.median(statistics.median(r[k]) / statistics.median(r[0]) for r in rounds)
        for k in range(3)
    ]

    print()
    print(
        f"config: model={args.model} layers={args.layers} hidden={args.hidden} "
        f"heads={args.heads} vocab={args.vocab} params={n_params / 1e6:.2f}M float32; "
        f"B={args.batch} pairs, prompt={args.prompt_len}, response={args.response_len} "
        f"(L={args.prompt_len + args.response_len}, {tokens_per_step} tokens/step); "
        f"sigmoid beta={args.beta}, AdamW lr={args.lr}, clip 1.0; "
        f"{args.rounds} rounds x ({args.warmup} warmup + {args.steps} timed) steps; "
        f"dpo_jax memory_efficient={args.memory_efficient}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"sched_getaffinity={len(os.sched_getaffinity(0))}, torch.get_num_threads()="
        f"{torch.get_num_threads()}, jax devices={jax.devices()}"
    )
    print(
        f"versions: jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}; TRL optimizer "
        f"{trl_holder['optimizer']} {trl_holder['optimizer_defaults']}"
    )
    print(f"dpo_jax compile (lower + compile, excluded): {compile_s:.2f} s")
    print()
    print("| framework | step median ms | step p90 ms | tokens/s | time / dpo_jax time |")
    print("|---|---|---|---|---|")
    for name, med, q90, ratio in zip(names, medians, p90s, ratios, strict=True):
        print(
            f"| {name} | {med * 1e3:.1f} | {q90 * 1e3:.1f} | {tokens_per_step / med:,.0f} | "
            f"{ratio:.2f}x |"
        )
    for k in (1, 2):
        per_round = [statistics.median(r[k]) / statistics.median(r[0]) for r in rounds]
        print(f"per-round {names[k]} / dpo_jax: {', '.join(f'{x:.2f}' for x in per_round)}")


if __name__ == "__main__":
    main()
