"""TFDS builders: generate array_record from local files, read back with tfds.data_source."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from dpo_jax.data import tfds_builders
from dpo_jax.data.examples import RecordError

H, A = "\n\nHuman:", "\n\nAssistant:"


def _hh_record(subset: str, split: str, i: int) -> dict:
    # Two turns: the prompt must run to the *last* "\n\nAssistant:", not the first.
    history = f"{H} hi {subset} {split} {i}{A} hello{H} question {i} é?{A}"
    return {"chosen": history + f" good answer {i}", "rejected": history + f" bad {i}"}


def _write_jsonl_gz(path, records, extra_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def hh_dir(tmp_path_factory):
    """Fake official layout; each file ends with one record the HH rule cannot split."""
    root = tmp_path_factory.mktemp("hh")
    records = {}
    for subset in tfds_builders.HH_SUBSETS:
        for split, n in (("train", 3), ("test", 2)):
            recs = [_hh_record(subset, split, i) for i in range(n)]
            records[subset, split] = recs
            bad = json.dumps({"chosen": "no assistant turn", "rejected": "x"})
            _write_jsonl_gz(root / subset / f"{split}.jsonl.gz", recs, [bad])
    return root, records


def _read_all(name, split, data_dir):
    source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir))
    return [{k: v.decode("utf-8") for k, v in source[i].items()} for i in range(len(source))]


def test_hh_rlhf_split_prompt_round_trip(hh_dir, tmp_path):
    root, records = hh_dir
    builder = tfds_builders.prepare("hh_rlhf/helpful_base", manual_dir=root, data_dir=tmp_path)
    assert builder.info.file_format.value == "array_record"
    for split in ("train", "test"):
        got = _read_all("hh_rlhf/helpful_base", split, tmp_path)
        want = []
        for r in records["helpful-base", split]:
            cut = r["chosen"].rindex(A) + len(A)
            want.append(
                {
                    "prompt": r["chosen"][:cut],
                    "chosen": r["chosen"][cut:],
                    "rejected": r["rejected"][cut:],
                }
            )
        assert got == want
        assert got[0]["prompt"].count(A) == 2 and got[0]["chosen"] == " good answer 0"
    # The unsplittable record of each file was skipped and counted in the stored metadata.
    counts = tfds.builder("hh_rlhf/helpful_base", data_dir=os.fspath(tmp_path)).info.metadata
    assert counts["bad_records"] == {
        "test": {"kept": 2, "skipped": {"not_hh_transcript": 1}},
        "train": {"kept": 3, "skipped": {"not_hh_transcript": 1}},
    }


def test_hh_rlhf_all_raw_keeps_transcripts_in_file_order(hh_dir, tmp_path):
    root, records = hh_dir
    tfds_builders.prepare("hh_rlhf/all_raw", manual_dir=root, data_dir=tmp_path)
    got = _read_all("hh_rlhf/all_raw", "train", tmp_path)
    bad = {"chosen": "no assistant turn", "rejected": "x"}
    # Raw transcripts need no prompt split, so the odd record is kept as is.
    want = [r for s in tfds_builders.HH_SUBSETS for r in records[s, "train"] + [bad]]
    assert got == want


def test_hh_rlhf_raise_policy_names_file_and_line(hh_dir, tmp_path):
    root, _ = hh_dir
    config = tfds_builders.HhRlhfConfig(
        name="strict", subsets=("harmless-base",), on_bad_record="raise"
    )
    with pytest.raises(
        RecordError, match=r"harmless-base/train\.jsonl\.gz, line 4, field 'chosen'"
    ):
        tfds_builders.prepare("hh_rlhf", manual_dir=root, data_dir=tmp_path, config=config)


def test_hh_rlhf_missing_file_is_named(tmp_path):
    (tmp_path / "hh" / "helpful-base").mkdir(parents=True)
    _write_jsonl_gz(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz", [_hh_record("a", "b", 0)])
    with pytest.raises(FileNotFoundError, match=r"helpful-base/test\.jsonl\.gz"):
        tfds_builders.prepare(
            "hh_rlhf/helpful_base", manual_dir=tmp_path / "hh", data_dir=tmp_path / "data"
        )


def test_preference_files_discovers_splits_and_formats(tmp_path):
    manual = tmp_path / "files"
    manual.mkdir()
    train = [{"prompt": f"p{i} ü", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(4)]
    (manual / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    # Implicit prompt: the shared prefix becomes the prompt (formats.extract_prompt).
    _write_jsonl_gz(
        manual / "validation.jsonl.gz", [{"chosen": "Q: x A: yes", "rejected": "Q: x A: no"}]
    )
    test = [{"prompt": "tp", "chosen": " tc", "rejected": " tr"}]
    pq.write_table(pa.Table.from_pylist(test), manual / "test-00000-of-00001.parquet")
    (manual / "notes.txt").write_text("ignored")

    builder = tfds_builders.prepare("preference_files", manual_dir=manual, data_dir=tmp_path / "d")
    assert sorted(builder.info.splits) == ["test", "train", "validation"]
    assert _read_all("preference_files", "train", tmp_path / "d") == train
    assert _read_all("preference_files", "test", tmp_path / "d") == test
    assert _read_all("preference_files", "validation", tmp_path / "d") == [
        {"prompt": "Q: x A:", "chosen": " yes", "rejected": " no"}
    ]


def test_preference_files_custom_config_and_bad_records(tmp_path):
    manual = tmp_path / "files"
    manual.mkdir()
    lines = [
        json.dumps({"prompt": "p0", "chosen": "c0", "rejected": "r0"}),
        json.dumps({"prompt": "p1", "chosen": "c1"}),  # no rejected
        "{not json",
        json.dumps({"prompt": "p3", "chosen": "c3", "rejected": "r3"}),
    ]
    (manual / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    strict = tfds_builders.PreferenceFilesConfig(
        name="strict", data_files={"train": ["*.jsonl"]}, record_format="standard"
    )
    with pytest.raises(RecordError, match=r"prefs\.jsonl, line 2, field 'rejected'"):
        tfds_builders.prepare(
            "preference_files", manual_dir=manual, data_dir=tmp_path / "d", config=strict
        )

    lenient = tfds_builders.PreferenceFilesConfig(
        name="lenient",
        data_files={"train": "prefs.jsonl"},
        record_format="standard",
        on_bad_record="skip",
    )
    builder = tfds_builders.prepare(
        "preference_files", manual_dir=manual, data_dir=tmp_path / "d", config=lenient
    )
    got = _read_all("preference_files/lenient", "train", tmp_path / "d")
    assert [r["prompt"] for r in got] == ["p0", "p3"]
    assert builder.info.metadata["bad_records"]["train"] == {
        "kept": 2,
        "skipped": {"invalid_json": 1, "missing_field": 1},
    }


def test_preference_files_config_validation():
    with pytest.raises(ValueError, match="record_format"):
        tfds_builders.PreferenceFilesConfig(name="x", record_format="conversational")
    with pytest.raises(ValueError, match="on_bad_record"):
        tfds_builders.PreferenceFilesConfig(name="x", on_bad_record="ignore")
    with pytest.raises(ValueError, match="subsets"):
        tfds_builders.HhRlhfConfig(name="x", subsets=("red-team-attempts",))
