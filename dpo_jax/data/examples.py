"""Parsed and tokenized examples, record locations, and bad-record errors.

These small frozen dataclasses are the meeting point of the data modules:
sources yield raw records with a `Location`, formats turn them into
`PreferenceExample` / `UnpairedExample` / `SFTExample`, tokenize turns those into
`TokenizedPair` / `TokenizedUnpaired` / `TokenizedSequence`, and batching packs or pads
them.

Bad input is reported as a `RecordError` (file, record index, field, reason). Under
`on_bad_record="skip"` the caller hands the error to a `BadRecordCounter` instead of
raising, which counts it per reason and logs a one-line summary at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Literal

OnBadRecord = Literal["raise", "skip"]
ON_BAD_RECORD_CHOICES = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

    The full chosen text is `prompt + chosen` (no separator is inserted).
    `templated` is True when the text was rendered by a chat template: the template then
    decides BOS and end-of-turn tokens, so tokenization adds neither BOS nor EOS (as TRL
    does for conversational data).
    """

    prompt: str
    chosen: str
    rejected: str
    templated: bool = False


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    """A prompt with one completion and a desirable (True) / undesirable (False) label (KTO).

    `templated`: as in `PreferenceExample`.
    """

    prompt: str
    completion: str
    label: bool
    templated: bool = False


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """A prompt with the target completion for supervised fine-tuning."""

    prompt: str
    completion: str
    templated: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """Token ids of a preference pair.

    `chosen_ids` / `rejected_ids` are the response tokens incl. the final EOS; the full
    sequences are `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids`. Only the
    response tokens are scored (loss_mask 1).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
    """Token ids of one prompt + completion (SFT, or one side of an unpaired example).

    `completion_ids` include the final EOS; the full sequence is
    `prompt_ids + completion_ids` and only the completion is scored.
    """

    prompt_ids: list[int]
    completion_ids: list[int]


@dataclasses.dataclass(frozen=True)
class TokenizedUnpaired:
    """Token ids of one unpaired (KTO) example: prompt + completion, and its label.

    `completion_ids` include the final EOS; only the completion is scored. `label`: True =
    desirable, False = undesirable.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a raw record came from: a file and a 1-based line (text files) or 0-based row.

    `unit` is "line" for JSONL (1-based, as editors show it), "record" for the elements
    of a JSON list (0-based), "row" for parquet / Arrow datasets (0-based).
    """

    file: str
    index: int | None = None
    unit: str = "line"

    def __str__(self) -> str:
        if self.index is None:
            return self.file
        return f"{self.file}, {self.unit} {self.index}"


class RecordError(ValueError):
    """A record that cannot be used, with the file, record index and field to blame.

    `reason` is a short stable key (e.g. "missing_field", "invalid_json") used to count
    skipped records per cause; `message` is the human explanation.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        file: str | None = None,
        index: int | None = None,
        unit: str = "line",
        field: str | None = None,
    ):
        self.reason = reason
        self.message = message
        self.file = file
        self.index = index
        self.unit = unit
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(Location(self.file, self.index, self.unit)))
        elif self.index is not None:
            where.append(f"{self.unit} {self.index}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        prefix = ", ".join(where) if where else "record"
        return f"{prefix}: {self.message} [{self.reason}]"

    def at(self, location: Location | None) -> RecordError:
        """Returns a copy located at `location` (fields already set are kept)."""
        if location is None:
            return self
        return RecordError(
            self.reason,
            self.message,
            file=self.file if self.file is not None else location.file,
            index=self.index if self.index is not None else location.index,
            unit=self.unit if self.file is not None else location.unit,
            field=self.field,
        )

    def __reduce__(self):
        # Picklable for multiprocess loaders: ValueError's default reduce drops kwargs.
        return (
            _rebuild_record_error,
            (self.reason, self.message, self.file, self.index, self.unit, self.field),
        )


def _rebuild_record_error(reason, message, file, index, unit, field) -> RecordError:
    return RecordError(reason, message, file=file, index=index, unit=unit, field=field)


def check_on_bad_record(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD_CHOICES:
        raise ValueError(
            f"on_bad_record must be one of {ON_BAD_RECORD_CHOICES}, got {on_bad_record!r}"
        )


class BadRecordCounter:
    """Raises or counts bad records, depending on `on_bad_record`.

    Usage: `counter.handle(err)` inside the `except RecordError` of a record loop; it
    re-raises under "raise" and counts under "skip". `summary()` is a dict
    reason -> count; `log_summary()` logs it as one line.
    """

    def __init__(self, on_bad_record: OnBadRecord = "raise", *, name: str = "data"):
        check_on_bad_record(on_bad_record)
        self.on_bad_record = on_bad_record
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self.first_errors: dict[str, str] = {}
        self.num_ok = 0

    def handle(self, error: RecordError) -> None:
        if self.on_bad_record == "raise":
            raise error
        self.counts[error.reason] += 1
        self.first_errors.setdefault(error.reason, str(error))

    def ok(self) -> None:
        """Counts one good record (for the summary's denominator)."""
        self.num_ok += 1

    @property
    def num_skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary_line(self) -> str:
        if not self.counts:
            return f"{self.name}: {self.num_ok} records, none skipped"
        parts = ", ".join(f"{k}={v}" for k, v in self.summary().items())
        return f"{self.name}: {self.num_ok} records kept, {self.num_skipped} skipped ({parts})"

    def log_summary(self, logger: logging.Logger | None = None) -> str:
        """Logs the one-line summary (warning level if anything was skipped); returns it."""
        line = self.summary_line()
        logger = logger or logging.getLogger("dpo_jax.data")
        if self.counts:
            first = "; ".join(self.first_errors[k] for k in sorted(self.first_errors))
            logger.warning("%s. First of each: %s", line, first)
        else:
            logger.info("%s", line)
        return line
