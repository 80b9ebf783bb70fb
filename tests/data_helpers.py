"""Tiny local tokenizers for the data tests (no downloads).

`build_tokenizer(tmp_path)` trains a byte-level BPE (GPT-2 style pre-tokenizer, so merges
across a prompt/response boundary really happen) on a few sentences, wraps it in a
`PreTrainedTokenizerFast` with bos/eos/pad tokens and a ChatML-like chat template, saves it
and reloads it through `AutoTokenizer.from_pretrained(local_dir)`, the way users load theirs.
"""

from __future__ import annotations

import os

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
