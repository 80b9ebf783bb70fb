"""IMDb review texts (`dpo_jax.data.review_text`): parquet files in the Hugging Face
stanfordnlp/imdb layout, JSONL, and TFDS `imdb_reviews` prepared offline, without
TensorFlow, from a tiny fake `aclImdb_v1.tar.gz` in the original archive layout."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_jax.data import review_text
from dpo_jax.data.examples import RecordError

REVIEWS = {
    "train/pos": ["A joy from start to finish.<br /><br />Loved it.", "Superb cast."],
    "train/neg": ["Awful.<br />Truly bad.", "Dull <BR>and long."],
    "train/unsup": ["Saw it once."],
    "test/pos": ["Nice little film."],
    "test/neg": ["Meh.<br/> Skip it."],
}


def _parquet(path, texts, labels=None):
    labels = labels if labels is not None else [i % 2 for i in range(len(texts))]
    pq.write_table(pa.table({"text": texts, "label": labels}), path)
    return str(path)


def test_clean_review_replaces_every_break_tag_run_by_one_space():
    assert review_text.clean_review("Good.<br /><br />Great.") == "Good. Great."
    assert review_text.clean_review("a <br/>b<BR>c<br >d") == "a b c d"
    assert review_text.clean_review("  <br />only<br />  ") == "only"
    assert review_text.clean_review("no tags,  two spaces") == "no tags,  two spaces"


def test_parquet_file_directory_and_glob(tmp_path):
    root = tmp_path / "plain_text"
    root.mkdir()
    a = _parquet(root / "train-00000-of-00002.parquet", ["One.<br /><br />Two.", "Three."])
    _parquet(root / "train-00001-of-00002.parquet", ["Four."])
    (root / "README.md").write_text("not data")
    assert review_text.read_review_texts(a) == ["One. Two.", "Three."]
    everything = ["One. Two.", "Three.", "Four."]
    assert review_text.read_review_texts(root) == everything
    assert review_text.read_review_texts(str(root / "train-*.parquet")) == everything


def test_jsonl_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Fine.<br />Really.", "Ok"]))
    assert review_text.read_review_texts(path) == ["Fine. Really.", "Ok"]


def test_errors_name_the_file_and_the_row(tmp_path):
    bad = _parquet(tmp_path / "bad.parquet", ["fine", None, "also fine"])
    with pytest.raises(RecordError, match=r"bad\.parquet, row 1.*text"):
        review_text.read_review_texts(bad)
    empty = _parquet(tmp_path / "empty.parquet", ["fine", "<br /><br />"])
    with pytest.raises(RecordError, match=r"empty\.parquet, row 1.*empty"):
        review_text.read_review_texts(empty)
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(pa.table({"review": ["x"], "label": [0]}), renamed)
    with pytest.raises(RecordError, match=r"renamed\.parquet, row 0.*'label', 'review'"):
        review_text.read_review_texts(renamed)
    lines = tmp_path / "numbers.jsonl"
    lines.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(RecordError, match=r"numbers\.jsonl, line 2.*expected a string"):
        review_text.read_review_texts(lines)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet or JSON"):
        review_text.read_review_texts(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        review_text.read_review_texts(tmp_path / "missing.parquet")


@pytest.mark.parametrize(
    "spec,problem",
    [
        ("tfds:imdb_reviews?split=train", "no data_dir="),
        ("tfds:imdb_reviews?data_dir=/x", "no split="),
        ("tfds:?split=train&data_dir=/x", "no dataset name"),
        ("tfds:imdb_reviews?split=train&data_dir=/x&shuffle=1", "unknown key"),
    ],
)
def test_bad_tfds_specs_are_named(spec, problem):
    with pytest.raises(ValueError, match=problem):
        review_text.read_review_texts(spec)


def _fake_imdb_tarball(directory) -> str:
    """aclImdb/{train,test}/{pos,neg}/*.txt and train/unsup, as in the original archive."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "aclImdb_v1.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for folder, texts in REVIEWS.items():
            for i, text in enumerate(texts):
                data = text.encode()
                member = tarfile.TarInfo(f"aclImdb/{folder}/{i}_{7 + i}.txt")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return path


def test_tfds_imdb_reviews_prepared_offline_without_tensorflow(tmp_path, monkeypatch):
    from tensorflow_datasets.core.download import checksums, download_manager

    manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
    tarball = _fake_imdb_tarball(manual)
    spec = f"tfds:imdb_reviews?split=train&data_dir={data_dir}&manual_dir={manual}"
    # TFDS checks the archive against the original's registered size and sha256 ...
    with pytest.raises(download_manager.NonMatchingChecksumError, match="wrong checksum"):
        review_text.read_review_texts(spec)
    # ... so the test registers the fake archive's instead.
    builder = review_text._imdb_builder_class()
    (url,) = builder.url_infos
    info = checksums.compute_url_info(tarball)
    fake = checksums.UrlInfo(size=info.size, checksum=info.checksum, filename="aclImdb_v1.tar.gz")
    monkeypatch.setattr(builder, "url_infos", {url: fake})

    train = review_text.read_review_texts(spec)
    want = [review_text.clean_review(t) for t in REVIEWS["train/pos"] + REVIEWS["train/neg"]]
    assert sorted(train) == sorted(want)
    test = review_text.read_review_texts(f"tfds:imdb_reviews?split=test&data_dir={data_dir}")
    assert sorted(test) == ["Meh. Skip it.", "Nice little film."]
    unsup = f"tfds:imdb_reviews/plain_text?split=unsupervised&data_dir={data_dir}"
    assert review_text.read_review_texts(unsup) == ["Saw it once."]
    assert "tensorflow" not in sys.modules
    # A fresh process reads the prepared data without TensorFlow (and without our builder).
    code = (
        "import sys; from dpo_jax.data import review_text as r; "
        f"t = r.read_review_texts('tfds:imdb_reviews?split=test&data_dir={data_dir}'); "
        "print(len(t), 'tensorflow' in sys.modules)"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["2", "False"], out.stderr[-2000:]


def test_an_unprepared_tfds_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the TFDS dataset.*manual_dir="):
        review_text.read_review_texts(f"tfds:imdb_reviews?split=train&data_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="aclImdb_v1.tar.gz"):
        review_text.read_review_texts(
            f"tfds:imdb_reviews?split=train&data_dir={tmp_path}&manual_dir={tmp_path}"
        )
