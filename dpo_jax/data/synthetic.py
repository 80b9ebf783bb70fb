"""The quickstart's self-generated preference task: no download, learnable on a CPU in minutes.

Each prompt is a short random string of lowercase letters and digits followed by "=", e.g.
"k3x9=". The chosen response applies a fixed deterministic rule to that string (by default
it is reversed: "9x3k"); the rejected response is the chosen one with exactly one small,
local mistake (one character substituted, two neighbouring characters swapped, one
character dropped, or one character doubled). A tiny decoder fine-tuned with SFT on the
chosen responses and then with DPO should raise its held-out reward accuracy well above
chance, because the mistake is always detectable from the prompt.

Records use TRL's "standard" (non-conversational) preference format:
`{"prompt": str, "chosen": str, "rejected": str}`.

`build_char_tokenizer` writes a matching character-level Hugging Face tokenizer directory
(vocab of 100 tokens: 4 specials, newline and printable ASCII) that loads offline with
`transformers.AutoTokenizer.from_pretrained(path)`.
"""

from __future__ import annotations

import json
import os
import random
import string

DEFAULT_ALPHABET = string.ascii_lowercase + string.digits
RULES = ("reverse", "sort")
MISTAKES = ("substitute", "swap", "drop", "double")

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Printable ASCII plus newline: every character a record or the chat template can contain.
CHARACTERS = ("\n",) + tuple(chr(c) for c in range(32, 127))

# Roles become plain text; an assistant turn ends with EOS so that SFT/DPO responses and
# chat-formatted responses end the same way. The newline is a Jinja string literal because
# transformers renders with trim_blocks=True, which would eat a raw newline after a tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def apply_rule(text: str, rule: str = "reverse") -> str:
    """The correct response for prompt string `text` under `rule` ("reverse" or "sort")."""
    if rule == "reverse":
        return text[::-1]
    if rule == "sort":
        return "".join(sorted(text))
    raise ValueError(f"unknown synthetic rule {rule!r}; expected one of {RULES}")


def corrupt(answer: str, rng: random.Random, alphabet: str = DEFAULT_ALPHABET) -> str:
    """`answer` with exactly one small mistake; always differs from `answer`.

    The mistake kind is drawn uniformly from MISTAKES. A swap of two equal neighbours would
    change nothing, so a swap only picks positions whose characters differ, and falls back
    to a substitution when there are none (e.g. "aaa").
    """
    if not answer:
        raise ValueError("cannot corrupt an empty answer")
    kind = rng.choice(MISTAKES)
    if kind == "swap":
        spots = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if spots:
            i = rng.choice(spots)
            return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        kind = "substitute"
    if kind == "drop" and len(answer) > 1:
        i = rng.randrange(len(answer))
        return answer[:i] + answer[i + 1 :]
    if kind == "double":
        i = rng.randrange(len(answer))
        return answer[: i + 1] + answer[i] + answer[i + 1 :]
    # Substitution (also the fallback for dropping from a one-character answer, which would
    # leave an empty response).
    i = rng.randrange(len(answer))
    replacement = rng.choice([c for c in alphabet if c != answer[i]])
    return answer[:i] + replacement + answer[i + 1 :]


def make_preference_records(
    n: int,
    seed: int,
    *,
    rule: str = "reverse",
    min_length: int = 3,
    max_length: int = 8,
    alphabet: str = DEFAULT_ALPHABET,
) -> list[dict[str, str]]:
    """`n` preference records {"prompt", "chosen", "rejected"}, a pure function of its arguments.

    Prompt strings have a uniformly random length in [min_length, max_length]. Use disjoint
    seeds for train and held-out records (prompts may repeat by chance across seeds when
    strings are short; with the defaults that is rare).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    if len(set(alphabet)) < 2:
        raise ValueError(f"alphabet needs at least 2 distinct characters, got {alphabet!r}")
    if rule not in RULES:
        raise ValueError(f"unknown synthetic rule {rule!r}; expected one of {RULES}")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        length = rng.randint(min_length, max_length)
        text = "".join(rng.choice(alphabet) for _ in range(length))
        chosen = apply_rule(text, rule)
        records.append(
            {"prompt": text + "=", "chosen": chosen, "rejected": corrupt(chosen, rng, alphabet)}
        )
    return records


def write_jsonl(records: list[dict], path: str | os.PathLike) -> str:
    """Writes one JSON object per line (UTF-8), creating parent directories; returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def build_char_tokenizer(path: str | os.PathLike):
    """Writes a character-level HF tokenizer to directory `path` and returns it.

    Token ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then newline and printable ASCII
    (vocab size 100). Like Llama tokenizers, encoding adds BOS in front (add_bos_token=True)
    and never appends EOS: response tokenization appends EOS itself. Characters outside
    the vocab map to <unk>. Decoding concatenates characters (no spaces inserted).
    """
    from tokenizers import Tokenizer, decoders, models

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges splits every string into single characters, and unlike WordLevel
    # needs no pre-tokenizer, so spaces and newlines stay ordinary tokens.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    return save_tokenizer(backend, path)


def save_tokenizer(backend, path: str | os.PathLike, **options):
    """Wraps a `tokenizers.Tokenizer` whose ids 0-3 are SPECIAL_TOKENS as an HF fast tokenizer
    that adds BOS and never EOS, with the chat template; saves it to directory `path` and
    returns it. `options`: further `PreTrainedTokenizerFast` arguments."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        **options,
    )
    tokenizer.save_pretrained(os.fspath(path))
    return tokenizer
