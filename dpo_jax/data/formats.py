"""Record formats: raw dict records -> `PreferenceExample` / `UnpairedExample` / `SFTExample`.

Formats (auto-detected per record, or forced by name):
  "standard"        {"prompt": str, "chosen": str, "rejected": str}  (TRL standard)
  "implicit_prompt" {"chosen": str, "rejected": str}: the prompt is the shared prefix, cut
                    as TRL's `extract_prompt` does (a space right before the divergence goes
                    to the responses).
  "conversational"  the same keys holding lists of {"role", "content"} messages (explicit or
                    implicit prompt), rendered to text with the tokenizer's chat template the
                    way TRL's `apply_chat_template` does.
  "hh"              Anthropic HH raw transcripts {"chosen": str, "rejected": str} with
                    "\\n\\nHuman: ... \\n\\nAssistant: ...": the prompt runs up to and including
                    the last "\\n\\nAssistant:" of `chosen`, as in the DPO paper's code.
  "unpaired"        {"prompt", "completion", "label": bool} (KTO); message lists allowed.
  "sft"             {"prompt", "completion"}; message lists allowed.

Preference formats can also feed SFT (`parse_sft` takes the chosen side).
Every problem is a `RecordError` naming the field; callers add the file/line.
"""

from __future__ import annotations

from typing import Any

from dpo_jax.data.examples import (
    Location,
    PreferenceExample,
    RecordError,
    SFTExample,
    UnpairedExample,
)

PREFERENCE_FORMATS = ("standard", "implicit_prompt", "conversational", "hh")
FORMATS = PREFERENCE_FORMATS + ("unpaired", "sft")
HH_SEARCH_TERM = "\n\nAssistant:"
HH_HUMAN_TERM = "\n\nHuman:"


# ----------------------------------------------------------------------------- helpers


def _is_messages(value: Any) -> bool:
    # Same test as TRL's `is_conversational`: a list whose first item is a dict with a role.
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and ("role" in value[0])
    )


def _require(record: dict, field: str) -> Any:
    if field not in record:
        raise RecordError(
            "missing_field", f"missing field (record keys: {sorted(record)})", field=field
        )
    value = record[field]
    if value is None:
        raise RecordError("missing_field", "field is null", field=field)
    return value


def _require_str(record: dict, field: str, *, allow_empty: bool = False) -> str:
    value = _require(record, field)
    if not isinstance(value, str):
        raise RecordError(
            "not_a_string", f"expected a string, got {type(value).__name__}", field=field
        )
    if not allow_empty and not value.strip():
        raise RecordError("empty_field", "empty or whitespace-only text", field=field)
    return value


def _require_messages(record: dict, field: str) -> list[dict]:
    value = _require(record, field)
    if not isinstance(value, list) or not value:
        raise RecordError("bad_messages", "expected a non-empty list of messages", field=field)
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(
                "bad_messages", f"message {i} is not a {{'role', 'content'}} object", field=field
            )
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise RecordError(
                "bad_messages", f"message {i}: role and content must be strings", field=field
            )
    return value


def _check_pair(
    prompt: str, chosen: str, rejected: str, templated: bool = False
) -> PreferenceExample:
    if not chosen.strip():
        raise RecordError("empty_response", "empty chosen response", field="chosen")
    if not rejected.strip():
        raise RecordError("empty_response", "empty rejected response", field="rejected")
    if chosen == rejected:
        raise RecordError(
            "identical_responses", "chosen and rejected responses are identical", field="rejected"
        )
    return PreferenceExample(prompt, chosen, rejected, templated)


# ----------------------------------------------------------------------------- prompts


def extract_prompt(chosen, rejected):
    """Splits an implicit prompt off two sequences, with TRL 1.16 `extract_prompt` semantics.

    Works on strings (characters) and on message lists (whole messages). The prompt is the
    common prefix up to the first difference; for strings a space just before the
    difference goes to the responses (TRL: "remove space before the prompt"). If one
    sequence is a prefix of the other the loop never finds a difference and TRL cuts one
    item early, so both responses keep the last shared item; we do the same.

    Deviation (degenerate input only): TRL crashes on an empty sequence and, when the very
    first items differ, reads index -1; here an empty input is an error and a first-item
    difference gives an empty prompt.

    Returns:
      (prompt, chosen_rest, rejected_rest), same types as the inputs.
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise RecordError(
            "empty_field",
            "cannot extract a prompt from an empty sequence",
            field="chosen" if not chosen else "rejected",
        )
    idx = n - 1  # TRL's value when the loop ends without a difference
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            if i > 0 and chosen[i - 1] == " ":
                idx = i - 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def extract_anthropic_prompt(transcript: str, field: str = "chosen") -> str:
    """Prompt of an HH transcript: everything up to and including the last "\\n\\nAssistant:".

    Same rule as `extract_anthropic_prompt` in the DPO paper's code
    (eric-mitchell/direct-preference-optimization, preference_datasets.py), which asserts
    that the search term exists; here its absence is a `RecordError`.
    """
    idx = transcript.rfind(HH_SEARCH_TERM)
    if idx == -1:
        raise RecordError(
            "not_hh_transcript", f"no {HH_SEARCH_TERM!r} in the transcript", field=field
        )
    return transcript[: idx + len(HH_SEARCH_TERM)]


# ----------------------------------------------------------------------------- chat templates


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def render_prompt_and_completions(
    tokenizer,
    prompt: list[dict],
    completions: list[list[dict]],
    template_kwargs: dict | None = None,
) -> tuple[str, list[str]]:
    """Renders a conversational prompt and its completions to text (TRL `apply_chat_template`).

    The prompt is rendered with the generation prompt if its last message is from the
    user/tool, or continuing the final message if it is from the assistant; each
    prompt+completion conversation is rendered whole, the prompt text is cut to the common
    prefix with all of them (templates such as DeepSeek-R1's render the prompt alone
    differently), and each completion is the rendered text after that prefix. So
    `prompt + completion` is exactly the rendered full conversation.
    """
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise RecordError(
            "no_chat_template",
            "conversational records need a tokenizer with a chat_template",
            field="prompt",
        )
    kw = dict(template_kwargs or {})
    last_role = prompt[-1]["role"]
    if last_role in ("user", "tool"):
        flags = {"add_generation_prompt": True, "continue_final_message": False}
    elif last_role == "assistant":
        flags = {"add_generation_prompt": False, "continue_final_message": True}
    else:
        raise RecordError(
            "bad_messages",
            f"invalid role of the last prompt message: {last_role!r}",
            field="prompt",
        )
    prompt_text = _render(tokenizer, prompt, **flags, **kw)
    fulls = [_render(tokenizer, prompt + c, **kw) for c in completions]
    for full in fulls:
        prompt_text = _common_prefix(prompt_text, full)
    return prompt_text, [full[len(prompt_text) :] for full in fulls]


# ----------------------------------------------------------------------------- detection


def detect_format(record: dict) -> str:
    """Guesses the format of one record from its keys and value types."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"expected a dict, got {type(record).__name__}")
    if "chosen" in record and "rejected" in record:
        if any(_is_messages(record.get(k)) for k in ("prompt", "chosen", "rejected")):
            return "conversational"
        if "prompt" in record:
            return "standard"
        c, r = record["chosen"], record["rejected"]
        if (
            isinstance(c, str)
            and isinstance(r, str)
            and c.startswith(HH_HUMAN_TERM)
            and HH_SEARCH_TERM in c
            and HH_SEARCH_TERM in r
        ):
            return "hh"
        return "implicit_prompt"
    if "prompt" in record and "completion" in record:
        return "unpaired" if "label" in record else "sft"
    raise RecordError(
        "unknown_format",
        "cannot tell the format: expected chosen/rejected (+prompt), or prompt/completion "
        f"(+label); record keys: {sorted(record)}",
    )


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise ValueError(f"unknown record format {fmt!r}; expected 'auto' or one of {allowed}")


# ----------------------------------------------------------------------------- parsers


def _parse_preference(record: dict, fmt: str, tokenizer, template_kwargs) -> PreferenceExample:
    if fmt == "standard":
        return _check_pair(
            _require_str(record, "prompt", allow_empty=True),
            _require_str(record, "chosen"),
            _require_str(record, "rejected"),
        )
    if fmt == "implicit_prompt":
        chosen = _require_str(record, "chosen")
        rejected = _require_str(record, "rejected")
        return _check_pair(*extract_prompt(chosen, rejected))
    if fmt == "hh":
        chosen = _require_str(record, "chosen")
        rejected = _require_str(record, "rejected")
        prompt = extract_anthropic_prompt(chosen, "chosen")
        if not rejected.startswith(prompt):
            # The paper's code slices rejected[len(prompt):] blindly; a different dialogue
            # history would silently train on a wrong pair.
            raise RecordError(
                "prompt_mismatch",
                "rejected transcript does not start with the chosen prompt",
                field="rejected",
            )
        return _check_pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :])
    if fmt == "conversational":
        chosen = _require_messages(record, "chosen")
        rejected = _require_messages(record, "rejected")
        prompt = record.get("prompt")
        # TRL `maybe_extract_prompt`: an explicit prompt counts only if it is conversational
        # like the responses; otherwise the prompt is the shared leading messages.
        if prompt is not None and _is_messages(prompt):
            prompt = _require_messages(record, "prompt")
        else:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
            if not prompt:
                raise RecordError(
                    "empty_field", "no shared leading messages to use as prompt", field="prompt"
                )
        if not chosen or not rejected:
            raise RecordError(
                "empty_response",
                "no response messages after the prompt",
                field="chosen" if not chosen else "rejected",
            )
        text, (c, r) = render_prompt_and_completions(
            tokenizer, prompt, [chosen, rejected], template_kwargs
        )
        return _check_pair(text, c, r, templated=True)
    raise ValueError(f"{fmt!r} is not a preference format; expected one of {PREFERENCE_FORMATS}")


def _parse_prompt_completion(record: dict, tokenizer, template_kwargs) -> tuple[str, str, bool]:
    prompt, completion = _require(record, "prompt"), _require(record, "completion")
    templated = _is_messages(prompt) or _is_messages(completion)
    if templated:
        prompt = _require_messages(record, "prompt")
        completion = _require_messages(record, "completion")
        prompt, (completion,) = render_prompt_and_completions(
            tokenizer, prompt, [completion], template_kwargs
        )
    else:
        prompt = _require_str(record, "prompt", allow_empty=True)
        completion = _require_str(record, "completion")
    if not completion.strip():
        raise RecordError("empty_response", "empty completion", field="completion")
    return prompt, completion, templated


def parse_preference(
    record: dict,
    *,
    format: str = "auto",
    tokenizer=None,
    template_kwargs: dict | None = None,
    location: Location | None = None,
) -> PreferenceExample:
    """Parses one raw record into a `PreferenceExample`.

    Args:
      record: the raw dict.
      format: "auto" or one of PREFERENCE_FORMATS.
      tokenizer: needed for conversational records (its chat template renders them).
      template_kwargs: extra chat-template variables (merged with a record's
        "chat_template_kwargs", as TRL does).
      location: file/line to put in errors.
    """
    try:
        fmt = detect_format(record) if format == "auto" else format
        if format == "auto" and fmt not in PREFERENCE_FORMATS:
            # A data error (one stray record in a preference file), not a wrong argument:
            # it gets the file and line, and `on_bad_record="skip"` can skip it.
            raise RecordError(
                "not_a_preference_record",
                f"a prompt/completion ({fmt}) record in preference data; expected "
                f"chosen/rejected (record keys: {sorted(record)})",
                field="chosen",
            )
        _check_format(fmt, PREFERENCE_FORMATS)
        kw = {**(template_kwargs or {}), **(record.get("chat_template_kwargs") or {})}
        return _parse_preference(record, fmt, tokenizer, kw)
    except RecordError as e:
        raise e.at(location) from None


def parse_unpaired(
    record: dict,
    *,
    tokenizer=None,
    template_kwargs: dict | None = None,
    location: Location | None = None,
) -> UnpairedExample:
    """Parses a {"prompt", "completion", "label"} record (KTO); label must be a bool (or 0/1)."""
    try:
        if not isinstance(record, dict):
            raise RecordError("not_an_object", f"expected a dict, got {type(record).__name__}")
        kw = {**(template_kwargs or {}), **(record.get("chat_template_kwargs") or {})}
        prompt, completion, templated = _parse_prompt_completion(record, tokenizer, kw)
        label = _require(record, "label")
        if isinstance(label, bool):
            pass
        elif isinstance(label, int) and label in (0, 1):
            label = bool(label)
        else:
            raise RecordError(
                "bad_label", f"label must be true/false, got {label!r}", field="label"
            )
        return UnpairedExample(prompt, completion, label, templated)
    except RecordError as e:
        raise e.at(location) from None


def unpair_preference(example: PreferenceExample) -> tuple[UnpairedExample, UnpairedExample]:
    """A pair as two KTO examples, (prompt, chosen, desirable) and (prompt, rejected,
    undesirable): TRL's `unpair_preference_dataset`, which `KTOTrainer` applies to paired
    data."""
    return (
        UnpairedExample(example.prompt, example.chosen, True, example.templated),
        UnpairedExample(example.prompt, example.rejected, False, example.templated),
    )


def parse_unpaired_examples(
    record: dict,
    *,
    format: str = "auto",
    tokenizer=None,
    template_kwargs: dict | None = None,
    location: Location | None = None,
) -> tuple[UnpairedExample, ...]:
    """The KTO examples of one record: an unpaired record gives one, a preference pair two
    (`unpair_preference`).

    format: "auto" (a record with chosen and rejected is a pair, any other must be unpaired,
    so a prompt/completion record without its label is a missing-label error), "unpaired",
    or a preference format.
    """
    _check_format(format, ("auto", *FORMATS))
    paired = format in PREFERENCE_FORMATS or (
        format == "auto" and isinstance(record, dict) and {"chosen", "rejected"} <= set(record)
    )
    if paired:
        fmt = "auto" if format == "auto" else format
        example = parse_preference(
            record, format=fmt, tokenizer=tokenizer, template_kwargs=template_kwargs,
            location=location,
        )  # fmt: skip
        return unpair_preference(example)
    if format not in ("auto", "unpaired"):
        raise ValueError(f"format {format!r} has no unpaired reading; use 'auto' or 'unpaired'")
    kw = dict(tokenizer=tokenizer, template_kwargs=template_kwargs, location=location)
    return (parse_unpaired(record, **kw),)


def parse_sft(
    record: dict,
    *,
    format: str = "auto",
    tokenizer=None,
    template_kwargs: dict | None = None,
    location: Location | None = None,
) -> SFTExample:
    """Parses a {"prompt", "completion"} record, or takes the chosen side of a preference one."""
    try:
        fmt = detect_format(record) if format == "auto" else format
        _check_format(fmt, FORMATS)
        kw = {**(template_kwargs or {}), **(record.get("chat_template_kwargs") or {})}
        if fmt in PREFERENCE_FORMATS:
            ex = _parse_preference(record, fmt, tokenizer, kw)
            return SFTExample(ex.prompt, ex.chosen, ex.templated)
        return SFTExample(*_parse_prompt_completion(record, tokenizer, kw))
    except RecordError as e:
        raise e.at(location) from None
