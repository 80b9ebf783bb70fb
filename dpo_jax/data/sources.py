"""Raw record sources: JSON, JSONL (optionally gzipped), parquet, HF `save_to_disk` datasets.

Every reader yields `(record: dict, location: Location)`. Locations are 1-based lines
for JSON / JSONL text (as editors show them) and 0-based rows for parquet / Arrow.

`parse_records` turns `(record, location)` items of any source into examples; it is the
only parsing path (files, TFDS records, the training run's data).

Broken records (invalid JSON on a JSONL line, invalid UTF-8, a value that is not an
object) raise a `RecordError` naming the file and line, or are skipped and counted when
`on_bad_record="skip"`. Errors that make the rest of a file unreadable (a JSON list that
stops parsing, a truncated gzip stream, a missing file) always raise.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from dpo_jax.data.examples import BadRecordCounter, Location, OnBadRecord, RecordError

SOURCE_FORMATS = ("jsonl", "json", "parquet", "hf_disk")

Record = dict[str, Any]


def detect_source_format(path: str) -> str:
    """Guesses the source format from the path: a directory is an HF `save_to_disk` dataset."""
    if os.path.isdir(path):
        return "hf_disk"
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(
        f"{path}: cannot tell the record format from the name; pass source_format= one of "
        f"{SOURCE_FORMATS}"
    )


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expands one path, a glob pattern, or a list of them, into a sorted list of paths."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise FileNotFoundError(f"{p}: the pattern matches no file")
            out.extend(matches)
        else:
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: no such file or directory")
            out.append(p)
    return out


def _open_binary(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _decode_line(raw: bytes, path: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            "invalid_utf8",
            f"invalid UTF-8 at byte {e.start} of the line ({raw[e.start : e.start + 4]!r})",
            file=path,
            index=line,
        ) from None


def read_jsonl(
    path: str, counter: BadRecordCounter | None = None
) -> Iterator[tuple[Record, Location]]:
    """Yields one object per non-blank line of a JSONL file (plain or .gz)."""
    counter = counter or BadRecordCounter("raise")
    try:
        with _open_binary(path) as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    text = _decode_line(raw, path, line_no)
                    if not text.strip():
                        continue
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise RecordError(
                            "invalid_json",
                            f"invalid JSON: {e.msg} (column {e.colno})",
                            file=path,
                            index=line_no,
                        ) from None
                    if not isinstance(record, dict):
                        raise RecordError(
                            "not_an_object",
                            f"expected a JSON object, got {type(record).__name__}",
                            file=path,
                            index=line_no,
                        )
                except RecordError as err:
                    counter.handle(err)
                    continue
                yield record, Location(path, line_no, "line")
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read the file: {e}") from e


def read_json(
    path: str, counter: BadRecordCounter | None = None
) -> Iterator[tuple[Record, Location]]:
    """Yields the objects of a JSON file holding a list of objects, located by start line.

    Elements are decoded one at a time so that each gets the line it starts on; a syntax
    error ends the file (there is no reliable resynchronisation point), so it always raises.
    """
    counter = counter or BadRecordCounter("raise")
    with _open_binary(path) as f:
        try:
            raw = f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read the file: {e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecordError(
            "invalid_utf8",
            f"invalid UTF-8 ({raw[e.start : e.start + 4]!r}); a JSON list cannot skip records, "
            "fix the file or convert it to JSONL",
            file=path,
            index=line,
        ) from None
    decoder = json.JSONDecoder()

    def syntax_error(pos: int, msg: str) -> RecordError:
        line = text.count("\n", 0, pos) + 1
        return RecordError("invalid_json", f"invalid JSON: {msg}", file=path, index=line)

    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise syntax_error(
            pos,
            "expected a JSON list of objects ('[' ...); for one object per line use a .jsonl file",
        )
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise syntax_error(e.pos, e.msg) from None
        if isinstance(record, dict):
            yield record, Location(path, line, "line")
        else:
            counter.handle(
                RecordError(
                    "not_an_object",
                    f"list element is a {type(record).__name__}, expected an object",
                    file=path,
                    index=line,
                )
            )
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if _skip_ws(text, pos + 1) != len(text):
                raise syntax_error(pos + 1, "extra data after the closing ']'")
            return
        raise syntax_error(pos, "expected ',' or ']' after a list element")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_parquet(path: str, batch_size: int = 1024) -> Iterator[tuple[Record, Location]]:
    """Yields the rows of a parquet file as dicts, located by 0-based row index."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
        raise ValueError(f"{path}: not a readable parquet file: {e}") from e
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            yield record, Location(path, row, "row")
            row += 1


def read_hf_disk(path: str, split: str | None = None) -> Iterator[tuple[Record, Location]]:
    """Yields the rows of a dataset saved with `datasets.Dataset.save_to_disk`.

    A saved `DatasetDict` needs `split`; the location names the split directory.
    """
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path}: not a dataset saved with save_to_disk: {e}") from e
    where = path
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{path}: holds splits {sorted(ds)}; pass split=")
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; it holds {sorted(ds)}")
        ds = ds[split]
        where = os.path.join(path, split)
    for row, record in enumerate(ds):
        yield record, Location(where, row, "row")


def iter_records(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    source_format: str | None = None,
    split: str | None = None,
    on_bad_record: OnBadRecord = "raise",
    counter: BadRecordCounter | None = None,
) -> Iterator[tuple[Record, Location]]:
    """Yields `(record, location)` from one or more files, globs or saved datasets, in order.

    Args:
      paths: a path, a glob pattern, or a list of them.
      source_format: one of SOURCE_FORMATS; None guesses from each path.
      split: the split of a saved `DatasetDict`.
      on_bad_record: "raise" or "skip"; ignored when `counter` is given (it decides).
      counter: shared counter of skipped records (make one to read its summary afterwards).
    """
    counter = counter or BadRecordCounter(on_bad_record)
    for path in expand_paths(paths):
        fmt = source_format or detect_source_format(path)
        if fmt == "jsonl":
            yield from read_jsonl(path, counter)
        elif fmt == "json":
            yield from read_json(path, counter)
        elif fmt == "parquet":
            yield from read_parquet(path)
        elif fmt == "hf_disk":
            yield from read_hf_disk(path, split)
        else:
            raise ValueError(f"unknown source_format {fmt!r}; expected one of {SOURCE_FORMATS}")


# What `parse_records` can make of a record (see its docstring).
KINDS = ("preference", "unpaired", "sft")


def parse_records(
    records: Iterable[tuple[Record, Location]],
    *,
    kind: str = "preference",
    record_format: str = "auto",
    tokenizer=None,
    counter: BadRecordCounter | None = None,
    count_ok: bool = True,
    template_kwargs: dict | None = None,
) -> Iterator[tuple[Any, Location]]:
    """Parses `(record, location)` items: yields `(example, location)` of the usable ones.

    The one parsing path of the package: files (`iter_examples`) and TFDS records
    (`dpo_jax.train.inputs`) both come through here, so a bad record is reported the same
    way whatever its source: a `RecordError` naming file, line and field, or skipped and
    counted.

    kind: "preference" (PreferenceExample), "unpaired" (UnpairedExample; a preference
      record gives two, its chosen side desirable and its rejected side undesirable, as
      TRL's `unpair_preference_dataset`) or "sft" (SFTExample; preference records give
      their chosen side).
    record_format: "auto" or a format name of `dpo_jax.data.formats`.
    tokenizer: renders conversational records with its chat template.
    counter: decides raise vs skip (default: raise); read its `summary()` afterwards.
    count_ok: count yielded examples as kept; False when a later stage (tokenization)
      may still drop them and counts the kept ones itself.
    template_kwargs: extra chat-template variables.
    """
    from dpo_jax.data import formats

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    counter = counter or BadRecordCounter("raise")
    kw = dict(tokenizer=tokenizer, template_kwargs=template_kwargs)
    for record, location in records:
        try:
            if kind == "preference":
                example = formats.parse_preference(
                    record, format=record_format, location=location, **kw
                )
            elif kind == "sft":
                example = formats.parse_sft(record, format=record_format, location=location, **kw)
            else:  # a preference pair gives its desirable and undesirable halves
                example = formats.parse_unpaired_examples(
                    record, format=record_format, location=location, **kw
                )
        except RecordError as e:
            counter.handle(e)
            continue
        if count_ok:
            counter.ok()
        for item in example if kind == "unpaired" else (example,):
            yield item, location


def iter_examples(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    kind: str = "preference",
    record_format: str = "auto",
    tokenizer=None,
    template_kwargs: dict | None = None,
    source_format: str | None = None,
    split: str | None = None,
    counter: BadRecordCounter | None = None,
    count_ok: bool = True,
) -> Iterator[tuple[Any, Location]]:
    """Reads and parses the records of files: `iter_records` + `parse_records`.

    counter: decides raise vs skip for both unreadable and unparsable records (default:
      raise); read its `summary()` / `log_summary()` afterwards. The other arguments as
      `iter_records` and `parse_records`.
    """
    counter = counter or BadRecordCounter("raise")
    records = iter_records(paths, source_format=source_format, split=split, counter=counter)
    yield from parse_records(
        records,
        kind=kind,
        record_format=record_format,
        tokenizer=tokenizer,
        counter=counter,
        count_ok=count_ok,
        template_kwargs=template_kwargs,
    )


def decode_record(record: Any, location: Location | None = None) -> Any:
    """Decodes a tfds record's UTF-8 `bytes` (and 0-d numpy values) to plain Python values.

    Other records (dicts of str) are returned unchanged.
    """
    if not isinstance(record, Mapping):
        return record
    out = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError("invalid_utf8", f"not valid UTF-8 ({err.reason})", field=key).at(
                    location
                ) from None
        out[key] = value
    return out
