"""Tokenization + truncation of parsed examples into `TokenizedPair` / `TokenizedSequence`.

Two modes:

"reference": the DPO paper's code (eric-mitchell/direct-preference-optimization,
  `tokenize_batch_element`). Prompt and responses are tokenized separately without special
  tokens, EOS is appended to each response (it must not occur inside the texts), then
    if len(prompt) + len(longer response) > max_length:
        prompt = prompt[:max_prompt_length]   ("keep_start")
              or prompt[-max_prompt_length:]  ("keep_end", used for Anthropic HH)
    if still > max_length:
        each response = response[:max_length - max_prompt_length]
"joint": TRL 1.16 `DPOTrainer` (`_prepare_dataset` + `DataCollatorForPreference`). EOS text
  is appended to each response unless present, prompt and prompt+response are tokenized
  as whole texts, the prompt is the longest common token prefix of the prompt with both
  full sequences (a merge across the boundary moves the split left), and truncation keeps
  the start: a pair whose prompt alone fills max_length is dropped, otherwise each
  response is cut to max_length - len(prompt). ("keep_end" is deprecated in TRL and would
  give chosen and rejected different prompts, so it is not offered in this mode.)

BOS: added only where the tokenizer itself adds it (its post-processor prefix), counted
in the prompt budget, and never twice: text that already starts with it is left alone.
Chat-template text (`example.templated`) gets neither BOS nor EOS added: the template
places them, as in TRL's conversational path.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Literal

from dpo_jax.data.examples import (
    BadRecordCounter,
    Location,
    PreferenceExample,
    RecordError,
    SFTExample,
    TokenizedPair,
    TokenizedSequence,
    TokenizedUnpaired,
    UnpairedExample,
)

logger = logging.getLogger("dpo_jax.data")

Mode = Literal["reference", "joint"]
TruncationMode = Literal["keep_start", "keep_end"]
MODES = ("reference", "joint")
TRUNCATION_MODES = ("keep_start", "keep_end")
# TokenizeStats events that mean some text of a record was cut off.
TRUNCATION_EVENTS = ("prompt_truncated", "response_truncated")


def load_tokenizer(path: str):
    """Loads a tokenizer from a local directory (no network access, no remote code)."""
    from transformers import AutoTokenizer

    # Checked here: transformers would take a missing path for a Hub repo id and answer
    # "Repo id must be in the form ...", which does not say that the directory is missing.
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer directory {path!r} does not exist (or is not a directory); set "
            "config.data.tokenizer (or config.model.hf_path) to a local tokenizer directory"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no eos_token; responses must end with one")
    return tokenizer


def pad_id_of(tokenizer) -> int:
    """The padding token of batches: the tokenizer's pad_token_id, else 0.

    Padding tokens are never scored (loss_mask 0) nor attended to (segment id 0), so any id
    works; the tokenizer's own keeps batches readable when decoded.
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else int(pad_id)


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """How to tokenize and truncate.

    max_length: longest prompt + response, in tokens (incl. BOS and EOS).
    max_prompt_length: the prompt budget when truncating ("reference" mode only; TRL 1.16
      has no separate prompt budget).
    """

    mode: Mode = "reference"
    max_length: int = 512
    max_prompt_length: int = 128
    truncation_mode: TruncationMode = "keep_start"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"tokenize mode must be one of {MODES}, got {self.mode!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}"
            )
        if self.mode == "joint" and self.truncation_mode != "keep_start":
            raise ValueError(
                "mode='joint' follows TRL, which only keeps the start (keep_end would give "
                "chosen and rejected different prompts); use mode='reference' for keep_end"
            )
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.mode == "reference" and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length < max_length, got {self.max_prompt_length} and "
                f"{self.max_length}: otherwise no room is left for the response"
            )


class TokenizeStats:
    """Counts of noteworthy (not bad) events, e.g. truncations and boundary merges."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self._warned: set[str] = set()

    def count(self, event: str, warning: str | None = None) -> None:
        self.counts[event] += 1
        if warning is not None and event not in self._warned:
            self._warned.add(event)
            logger.warning("%s (counted as %r; warned once)", warning, event)

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def log_summary(self, config: TokenizeConfig | None = None) -> str:
        """Logs the counts as one line, at WARNING level when texts were truncated; returns it.

        Truncation changes what is trained on (a prompt cut to its budget loses context, a
        cut response loses its EOS), so the run says how often, once, not per record.
        """
        cut = {k: self.counts[k] for k in TRUNCATION_EVENTS if self.counts[k]}
        budget = ""
        if config is not None:
            budget = f" (max_length={config.max_length}"
            if config.mode == "reference":
                budget += f", max_prompt_length={config.max_prompt_length}"
            budget += f", truncation_mode={config.truncation_mode})"
        line = f"tokenization events: {self.summary() or 'none'}"
        if cut:
            what = ", ".join(f"{n} {k.split('_')[0]}s" for k, n in cut.items())
            line = f"truncated {what} to fit{budget}; {line}"
            logger.warning("%s", line)
        else:
            logger.info("%s", line)
        return line


# ----------------------------------------------------------------------------- helpers


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when adding special tokens (BOS or none)."""
    cache = getattr(tokenizer, "_dpo_jax_special_prefix", None)
    if cache is not None:
        return list(cache)
    probe = "a"
    plain = _encode(tokenizer, probe)
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    prefix = []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix = full[:start]
            break
    try:
        tokenizer._dpo_jax_special_prefix = tuple(prefix)
    except AttributeError:  # some tokenizer classes forbid new attributes; recompute then
        pass
    return prefix


def _leading_special(tokenizer) -> list[int]:
    """BOS ids that keep_end truncation must not cut off (also when a template rendered them)."""
    prefix = special_prefix(tokenizer)
    if prefix:
        return prefix
    bos = tokenizer.bos_token_id
    # GPT-2 style tokenizers reuse EOS as BOS and never add it: nothing to protect.
    return [bos] if bos is not None and bos != tokenizer.eos_token_id else []


def _with_prefix(prefix: list[int], ids: list[int]) -> list[int]:
    if prefix and ids[: len(prefix)] == prefix:
        return ids  # the text already starts with BOS (e.g. a template rendered it): not twice
    return prefix + ids


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _check_no_eos(ids: list[int], eos_id: int, field: str) -> None:
    if eos_id in ids:
        raise RecordError(
            "contains_eos",
            "the text contains the EOS token; it would end the sequence early",
            field=field,
        )


# ----------------------------------------------------------------------------- reference


def _truncate_reference(
    prompt: list[int],
    responses: list[list[int]],
    head_len: int,
    cfg: TokenizeConfig,
    stats: TokenizeStats | None,
) -> tuple[list[int], list[list[int]]]:
    longer = max(len(r) for r in responses)
    if len(prompt) + longer > cfg.max_length:
        # The BOS prefix stays in front and counts towards max_prompt_length.
        head, body = prompt[:head_len], prompt[head_len:]
        keep = max(cfg.max_prompt_length - len(head), 0)
        if cfg.truncation_mode == "keep_start":
            body = body[:keep]
        else:
            body = body[len(body) - keep :] if keep < len(body) else body
        if len(head) + len(body) < len(prompt) and stats is not None:
            stats.count("prompt_truncated")
        prompt = head + body
    if len(prompt) + longer > cfg.max_length:
        budget = cfg.max_length - cfg.max_prompt_length
        if stats is not None:
            stats.count("response_truncated")
        responses = [r[:budget] for r in responses]
    return prompt, responses


def _reference(
    prompt: str,
    responses: list[str],
    fields: list[str],
    templated: bool,
    tokenizer,
    cfg: TokenizeConfig,
    stats: TokenizeStats | None,
) -> tuple[list[int], list[list[int]]]:
    eos = tokenizer.eos_token_id
    prompt_ids = _encode(tokenizer, prompt)
    response_ids = [_encode(tokenizer, r) for r in responses]
    prefix = [] if templated else special_prefix(tokenizer)
    if not templated:
        _check_no_eos(prompt_ids, eos, "prompt")
        for ids, field in zip(response_ids, fields, strict=True):
            _check_no_eos(ids, eos, field)
        response_ids = [ids + [eos] for ids in response_ids]
    full_prompt = _with_prefix(prefix, prompt_ids)
    lead = _leading_special(tokenizer)
    head_len = len(lead) if lead and full_prompt[: len(lead)] == lead else 0
    return _truncate_reference(full_prompt, response_ids, head_len, cfg, stats)


# ----------------------------------------------------------------------------- joint (TRL)


def _joint(
    prompt: str,
    responses: list[str],
    fields: list[str],
    templated: bool,
    tokenizer,
    cfg: TokenizeConfig,
    stats: TokenizeStats | None,
) -> tuple[list[int], list[list[int]]]:
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    prefix = [] if templated else special_prefix(tokenizer)
    if not templated:
        responses = [r if r.endswith(eos_text) else r + eos_text for r in responses]
    plain_prompt_ids = _encode(tokenizer, prompt)
    prompt_ids = _with_prefix(prefix, plain_prompt_ids)
    plain_full_ids = [_encode(tokenizer, prompt + r) for r in responses]
    full_ids = [_with_prefix(prefix, ids) for ids in plain_full_ids]
    if stats is not None and any(
        ids != plain_prompt_ids + _encode(tokenizer, r)
        for ids, r in zip(plain_full_ids, responses, strict=True)
    ):
        stats.count(
            "boundary_merge",
            "enc(prompt + response) != enc(prompt) + enc(response): tokens merge or split "
            "differently at the prompt/response boundary, so joint and reference "
            "tokenization differ on this data",
        )
    prompt_len = min(_common_prefix_length(prompt_ids, f) for f in full_ids)
    if prompt_len < len(prompt_ids) and stats is not None:
        stats.count(
            "prompt_boundary_moved",
            "the tokenized prompt is not a prefix of the tokenized prompt+response (tokens "
            "merge across the boundary or the template renders the prompt differently); the "
            "response starts where they diverge, as in TRL",
        )
    new_prompt = prompt_ids[:prompt_len]
    new_responses = [f[prompt_len:] for f in full_ids]
    if not templated:
        _check_no_eos(new_prompt, eos_id, "prompt")
        for ids, field in zip(new_responses, fields, strict=True):
            _check_no_eos(ids[:-1], eos_id, field)
    for ids, field in zip(new_responses, fields, strict=True):
        if not ids:
            raise RecordError("empty_response", "no response tokens after the prompt", field=field)
    if len(new_prompt) >= cfg.max_length:
        raise RecordError(
            "no_room_for_response",
            f"the prompt has {len(new_prompt)} tokens >= max_length={cfg.max_length}: no "
            "response token would be left (TRL drops such pairs)",
            field="prompt",
        )
    budget = cfg.max_length - len(new_prompt)
    if stats is not None and any(len(r) > budget for r in new_responses):
        stats.count("response_truncated")
    return new_prompt, [r[:budget] for r in new_responses]


# ----------------------------------------------------------------------------- public


def _run(prompt, responses, fields, templated, tokenizer, cfg, stats):
    if not templated and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: responses could not be terminated")
    fn = _reference if cfg.mode == "reference" else _joint
    prompt_ids, response_ids = fn(prompt, responses, fields, templated, tokenizer, cfg, stats)
    if not prompt_ids:
        # With no token before it, the first response token has no log-prob; a one-token
        # response would then score nothing and give a NaN mean later.
        raise RecordError(
            "empty_prompt",
            "the prompt has no tokens (and the tokenizer adds no BOS): the first response "
            "token could not be scored",
            field="prompt",
        )
    for ids, field in zip(response_ids, fields, strict=True):
        if not ids:
            raise RecordError("no_room_for_response", "no response token left", field=field)
    return prompt_ids, response_ids


def tokenize_pair(
    example: PreferenceExample,
    tokenizer,
    config: TokenizeConfig,
    stats: TokenizeStats | None = None,
) -> TokenizedPair:
    """Tokenizes and truncates a preference pair; see the module docstring for the rules.

    Returns `TokenizedPair`; `len(prompt_ids) + len(chosen_ids) <= config.max_length` (same
    for rejected). Raises `RecordError` (field named) for unusable pairs.
    """
    prompt_ids, (chosen_ids, rejected_ids) = _run(
        example.prompt,
        [example.chosen, example.rejected],
        ["chosen", "rejected"],
        example.templated,
        tokenizer,
        config,
        stats,
    )
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)


def tokenize_sequence(
    example: SFTExample | UnpairedExample,
    tokenizer,
    config: TokenizeConfig,
    stats: TokenizeStats | None = None,
) -> TokenizedSequence:
    """Tokenizes a prompt + completion (SFT or unpaired) with the same rules as one side of a pair.

    In "reference" mode this equals the paper's SFT mode (the pair code with chosen =
    rejected = the target).
    """
    prompt_ids, (completion_ids,) = _run(
        example.prompt,
        [example.completion],
        ["completion"],
        example.templated,
        tokenizer,
        config,
        stats,
    )
    return TokenizedSequence(prompt_ids, completion_ids)


def tokenize_examples(
    examples: Iterable[tuple[PreferenceExample | SFTExample | UnpairedExample, Location | None]],
    tokenizer,
    config: TokenizeConfig,
    counter: BadRecordCounter | None = None,
    stats: TokenizeStats | None = None,
) -> Iterator[tuple[TokenizedPair | TokenizedSequence | TokenizedUnpaired, Location | None]]:
    """Tokenizes `(example, location)` items; errors get the location, then raise or are counted.

    Preference examples give `TokenizedPair`, SFT ones `TokenizedSequence`, unpaired ones
    `TokenizedUnpaired` (the sequence and its label).
    """
    counter = counter or BadRecordCounter("raise")
    for example, location in examples:
        try:
            if isinstance(example, PreferenceExample):
                out = tokenize_pair(example, tokenizer, config, stats)
            elif isinstance(example, UnpairedExample):
                seq = tokenize_sequence(example, tokenizer, config, stats)
                out = TokenizedUnpaired(seq.prompt_ids, seq.completion_ids, example.label)
            else:
                out = tokenize_sequence(example, tokenizer, config, stats)
        except RecordError as e:
            counter.handle(e.at(location))
            continue
        counter.ok()
        yield out, location
