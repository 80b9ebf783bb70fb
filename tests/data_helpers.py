"""Helpers of the data tests: tiny local tokenizers (no downloads) and numpy batch oracles.

`build_tokenizer(tmp_path)` trains a byte-level BPE (GPT-2 style pre-tokenizer, so merges
across a prompt/response boundary really happen) on a few sentences, wraps it in a
`PreTrainedTokenizerFast` with bos/eos/pad tokens and a ChatML-like chat template, saves it
and reloads it through `AutoTokenizer.from_pretrained(local_dir)`, the way users load theirs.
"""

from __future__ import annotations

import os

import numpy as np

from dpo_jax.data import batching

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# `{{ bos_token }}` first, as Llama/Gemma templates do, to exercise "BOS never twice".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast.",
    "\n\nHuman: Can you help me?\n\nAssistant: Sure, I can help you with that.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Question: what color is the sky? Answer: the sky is blue. It is green.",
    "I think that is a good idea. I don't know. Yes, no, maybe.",
    "hello world, hello there, helpful assistant, harmless human",
]


def build_tokenizer(
    directory: str | os.PathLike,
    *,
    add_bos: bool = True,
    vocab_size: int = 400,
    chat_template: str | None = CHAT_TEMPLATE,
):
    """Trains, saves and reloads a tiny byte-level BPE tokenizer; returns the reloaded one.

    add_bos: whether plain `tokenizer(text)` prepends BOS (post-processor), like Llama;
      False behaves like GPT-2 / Pythia (the DPO paper's models).
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    directory = os.fspath(directory)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


# ----------------------------------------------------------------------------------------
# Batch oracles: plain numpy, to check the package's batches and jitted reductions against
# ----------------------------------------------------------------------------------------


def pack_pairs(pairs, *, num_rows: int, row_length: int, max_pairs: int, pad_id: int = 0):
    """Packs as many pairs as fit (`batching.plan_packing`); returns (batch, leftover pairs).

    Leftover pairs keep their input order, so a test can feed them first into the next call
    the way the pipeline's packing buffer does.
    """
    plan = batching.plan_packing(
        pairs, num_rows=num_rows, row_length=row_length, max_pairs=max_pairs
    )
    batch = batching.packed_batch(
        pairs, plan, row_length=row_length, max_pairs=max_pairs, pad_id=pad_id
    )
    return batch, [pairs[i] for i in plan.leftover]


def pair_sums(values, batch):
    """Per-pair sums of `values` over scored (loss_mask) tokens -> [B, 2] float64.

    values: the shape of batch["tokens"] (padded [B, 2, L] or packed [R, L]). A float64
    loop-free reference for `dpo_jax.logprobs.pair_sums`.
    """
    values = np.asarray(values)
    if values.shape != batch["tokens"].shape:
        raise ValueError(f"values shape {values.shape} != tokens shape {batch['tokens'].shape}")
    masked = values.astype(np.float64) * batch["loss_mask"]
    num_pairs = batch["pair_mask"].shape[0]
    if not batching.is_packed(batch):
        return masked.sum(axis=-1)
    slots = batch["slot_ids"].reshape(-1)
    keep = slots >= 0
    sums = np.zeros(2 * num_pairs, np.float64)
    np.add.at(sums, slots[keep], masked.reshape(-1)[keep])
    return sums.reshape(num_pairs, 2)


def pair_token_counts(batch):
    """Scored tokens per pair and side -> [B, 2] (chosen, rejected)."""
    return pair_sums(np.ones(batch["tokens"].shape), batch)
