"""Record sources: JSON, JSONL(.gz), parquet, save_to_disk; bad lines raise or are counted."""

import gzip
import json
import logging

import pytest

from dpo_jax.data.examples import (
    BadRecordCounter,
    Location,
    PreferenceExample,
    RecordError,
    SFTExample,
    UnpairedExample,
)
from dpo_jax.data.sources import iter_examples, iter_records, parse_records

RECORDS = [
    {"prompt": "Q1", "chosen": " a", "rejected": " b"},
    {"prompt": "Q2", "chosen": " c", "rejected": " d"},
    {"prompt": "Q3", "chosen": " é ✓", "rejected": " f"},
]


def write_jsonl(path, lines: list[bytes], compress=False):
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


@pytest.mark.parametrize("compress", [False, True])
def test_jsonl_records_and_line_numbers(tmp_path, compress):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in RECORDS]
    lines.insert(1, b"   ")  # blank lines are skipped but still counted as lines
    path = write_jsonl(tmp_path / ("d.jsonl.gz" if compress else "d.jsonl"), lines, compress)
    out = list(iter_records(path))
    assert [r for r, _ in out] == RECORDS
    assert [loc.index for _, loc in out] == [1, 3, 4]
    assert str(out[1][1]) == f"{path}, line 3"


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (b'{"prompt": "Q", "chosen": "a", ', "invalid_json"),
        (b'{"prompt": "Q\xff\xfe", "chosen": "a", "rejected": "b"}', "invalid_utf8"),
        (b'["not", "an", "object"]', "not_an_object"),
    ],
)
def test_jsonl_bad_line_raises_with_file_and_line(tmp_path, bad_line, reason):
    lines = [json.dumps(r).encode() for r in RECORDS]
    lines.insert(2, bad_line)
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(RecordError) as info:
        list(iter_records(path))
    assert (info.value.reason, info.value.file, info.value.index) == (reason, path, 3)
    assert f"{path}, line 3" in str(info.value)
    counter = BadRecordCounter("skip")
    out = list(iter_records(path, counter=counter))
    assert [r for r, _ in out] == RECORDS
    assert [loc.index for _, loc in out] == [1, 2, 4]
    assert counter.summary() == {reason: 1}


def test_truncated_gzip_is_a_file_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    data = gzip.compress(b"".join(b'{"a": %d}\n' % (i * 7919) for i in range(500)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="d.jsonl.gz: cannot read"):
        list(iter_records(str(path)))


def test_json_list_with_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")
    out = list(iter_records(str(path)))
    assert [r for r, _ in out] == RECORDS
    text_lines = path.read_text(encoding="utf-8").split("\n")
    for record, loc in out:  # each location is the line where the object starts
        assert text_lines[loc.index - 1].strip() == "{"
        assert json.dumps(record["prompt"]) in text_lines[loc.index]
    empty = tmp_path / "e.json"
    empty.write_text(" [ ] ")
    assert list(iter_records(str(empty))) == []


def test_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"prompt": "Q"},\n {"prompt": oops}\n]')
    with pytest.raises(RecordError) as info:
        list(iter_records(str(bad), on_bad_record="skip"))  # a broken list cannot be skipped
    assert (info.value.reason, info.value.index) == ("invalid_json", 3)
    obj = tmp_path / "obj.json"
    obj.write_text('{"prompt": "Q"}')
    with pytest.raises(RecordError, match="expected a JSON list"):
        list(iter_records(str(obj)))
    utf = tmp_path / "utf.json"
    utf.write_bytes(b'[\n{"prompt": "Q"},\n{"prompt": "\xc3\x28"}\n]')
    with pytest.raises(RecordError) as info:
        list(iter_records(str(utf)))
    assert (info.value.reason, info.value.index) == ("invalid_utf8", 3)
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"prompt": "Q"}, 3, {"prompt": "R"}]')
    counter = BadRecordCounter("skip")
    assert [r["prompt"] for r, _ in iter_records(str(mixed), counter=counter)] == ["Q", "R"]
    assert counter.summary() == {"not_an_object": 1}


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS), path, row_group_size=2)
    out = list(iter_records(path))
    assert [r for r, _ in out] == RECORDS
    assert [str(loc) for _, loc in out] == [f"{path}, row {i}" for i in range(3)]


def test_hf_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "single"))
    out = list(iter_records(str(tmp_path / "single")))
    assert [r for r, _ in out] == RECORDS and out[2][1].index == 2
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match="split"):
        list(iter_records(str(tmp_path / "dict")))
    out = list(iter_records(str(tmp_path / "dict"), split="test"))
    assert [r for r, _ in out] == RECORDS[:1]
    assert out[0][1].file.endswith("test")


def test_globs_and_missing_files(tmp_path):
    for i in range(2):
        write_jsonl(tmp_path / f"part{i}.jsonl", [json.dumps(RECORDS[i]).encode()])
    out = list(iter_records(str(tmp_path / "part*.jsonl")))
    assert [r for r, _ in out] == RECORDS[:2]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(iter_records(str(tmp_path / "x*.jsonl")))
    (tmp_path / "d.txt").write_text("{}")
    with pytest.raises(ValueError, match="source_format"):
        list(iter_records(str(tmp_path / "d.txt")))


def test_iter_examples_end_to_end_skip_summary(tmp_path, caplog):
    lines = [
        json.dumps(RECORDS[0]).encode(),
        b"{broken",
        json.dumps({"prompt": "Q", "chosen": " same", "rejected": " same"}).encode(),
        json.dumps({"prompt": "Q", "chosen": 5, "rejected": " x"}).encode(),
        json.dumps(RECORDS[1]).encode(),
    ]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(RecordError) as info:
        list(iter_examples(path))
    assert str(info.value).startswith(f"{path}, line 2: invalid JSON")
    counter = BadRecordCounter("skip", name="train")
    out = list(iter_examples(path, counter=counter))
    assert [ex for ex, _ in out] == [
        PreferenceExample("Q1", " a", " b"),
        PreferenceExample("Q2", " c", " d"),
    ]
    assert [loc.index for _, loc in out] == [1, 5]
    assert counter.summary() == {"identical_responses": 1, "invalid_json": 1, "not_a_string": 1}
    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        counter.log_summary()
    assert "train: 2 records kept, 3 skipped" in caplog.text
    assert f"{path}, line 4, field 'chosen'" in caplog.text
    sft = list(iter_examples(path, kind="sft", counter=BadRecordCounter("skip")))
    assert [ex.completion for ex, _ in sft] == [" a", " c"]
    with pytest.raises(ValueError, match="kind"):
        list(iter_examples(path, kind="nope"))


def test_parse_records_is_the_parsing_path_of_any_source():
    records = [
        ({"prompt": "Q1", "chosen": " a", "rejected": " b"}, Location("tfds x/train", 0, "record")),
        ({"prompt": "Q2", "completion": " c"}, Location("tfds x/train", 1, "record")),
        ({"prompt": "Q3", "chosen": " d", "rejected": " e"}, Location("tfds x/train", 2, "record")),
    ]
    with pytest.raises(RecordError, match=r"tfds x/train, record 1, field 'chosen'"):
        list(parse_records(records))
    counter = BadRecordCounter("skip")
    out = list(parse_records(records, counter=counter, count_ok=False))
    assert [loc.index for _, loc in out] == [0, 2]
    assert counter.summary() == {"not_a_preference_record": 1} and counter.num_ok == 0
    sft = list(parse_records(records, kind="sft", counter=BadRecordCounter("skip")))
    assert [ex for ex, _ in sft] == [
        SFTExample("Q1", " a"),
        SFTExample("Q2", " c"),
        SFTExample("Q3", " d"),
    ]
    unpaired = [({"prompt": "Q", "completion": " A", "label": 0}, Location("u.jsonl", 1))]
    assert [ex for ex, _ in parse_records(unpaired, kind="unpaired")] == [
        UnpairedExample("Q", " A", False)
    ]
