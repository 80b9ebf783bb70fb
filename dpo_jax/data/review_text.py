"""IMDb review texts from local files, for the sentiment experiment's "full" configuration
(the DPO paper's Sec. 6.1: prefixes of IMDb reviews, arXiv 2305.18290).

    texts = read_review_texts("/data/imdb/plain_text/train-00000-of-00001.parquet")
    texts = read_review_texts("tfds:imdb_reviews?split=train&data_dir=/data/tfds")

`spec` is one of:
  - a parquet file, a glob, or a directory of parquet files: the Hugging Face dataset
    stanfordnlp/imdb (columns `text` str, `label` 0/1; only `text` is read);
  - a JSONL / JSON file (glob, directory) of objects with a `text` field;
  - `tfds:NAME?split=SPLIT&data_dir=DIR[&manual_dir=MANUAL]`: a TFDS dataset (normally
    `imdb_reviews`) prepared as array_record in DIR, read with `tfds.data_source` (no
    TensorFlow). With `manual_dir`, a directory holding the original `aclImdb_v1.tar.gz`,
    `imdb_reviews` is first prepared there offline (`prepare_imdb_reviews`); a prepared
    DIR is reused.

Texts are returned in file order (TFDS: the prepared split's order), with IMDb's HTML line
breaks (`<br />`, 2 per paragraph break in the raw reviews) replaced by one space: the
reviews become one paragraph of prose, so prefixes, samples and the sentiment classifier
never see markup. Nothing else is changed. A missing or non-string `text`, or a review that
is empty once cleaned, raises a `RecordError` naming the file and the row (or line).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator

from dpo_jax.data import sources
from dpo_jax.data.examples import Location, RecordError

TFDS_PREFIX = "tfds:"
# Files a directory spec reads (what `sources.detect_source_format` knows, less hf_disk).
_TEXT_FILES = re.compile(r"\.(?:parquet|pq|jsonl|ndjson|json)(?:\.gz)?$", re.I)
# A run of HTML line breaks and the whitespace around it: <br />, <br/>, <br>, any case.
_BREAKS = re.compile(r"\s*(?:<br\s*/?>\s*)+", re.I)


def clean_review(text: str) -> str:
    """IMDb's `<br />` line breaks (any run of them) -> one space; outer whitespace stripped."""
    return _BREAKS.sub(" ", text).strip()


def read_review_texts(spec: str | os.PathLike) -> list[str]:
    """The cleaned review texts of `spec` (see the module docstring), in order."""
    spec = os.fspath(spec)
    if spec.startswith(TFDS_PREFIX):
        records = _tfds_records(spec)
    else:
        records = sources.iter_records(_expand(spec))
    return [_text(record, location) for record, location in records]


def _expand(spec: str) -> list[str]:
    """Files of a path / glob spec; a directory means its parquet and JSON(L) files."""
    paths = []
    for path in sources.expand_paths(spec):
        if not os.path.isdir(path):
            paths.append(path)
            continue
        found = sorted(
            os.path.join(path, name) for name in os.listdir(path) if _TEXT_FILES.search(name)
        )
        if not found:
            raise FileNotFoundError(f"{path}: the directory holds no parquet or JSON(L) file")
        paths.extend(found)
    return paths


def _text(record, location: Location) -> str:
    value = record.get("text") if isinstance(record, dict) else None
    if value is None:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise RecordError(
            "missing_field",
            f"no review text (fields: {fields})",
            file=location.file,
            index=location.index,
            unit=location.unit,
            field="text",
        )
    if not isinstance(value, str):
        raise RecordError(
            "wrong_type",
            f"expected a string, got {type(value).__name__}",
            file=location.file,
            index=location.index,
            unit=location.unit,
            field="text",
        )
    text = clean_review(value)
    if not text:
        raise RecordError(
            "empty",
            "the review is empty once its <br /> tags are removed",
            file=location.file,
            index=location.index,
            unit=location.unit,
            field="text",
        )
    return text


# ------------------------------------------------------------------------------------------
# TFDS imdb_reviews without TensorFlow
# ------------------------------------------------------------------------------------------


def parse_tfds_spec(spec: str) -> dict[str, str]:
    """`tfds:NAME?split=S&data_dir=D[&manual_dir=M]` -> {name, split, data_dir, manual_dir}."""
    parts = urllib.parse.urlsplit(spec)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"split", "data_dir", "manual_dir"})
    out = {k: query[k][-1] for k in ("split", "data_dir", "manual_dir") if k in query}
    out["name"] = parts.path
    problems = [f"unknown key(s) {unknown}"] if unknown else []
    problems += [f"no {k}=" for k in ("split", "data_dir") if not out.get(k)]
    if not parts.path:
        problems.append("no dataset name")
    if problems:
        raise ValueError(
            f"{spec!r}: {'; '.join(problems)}; expected "
            "tfds:NAME?split=SPLIT&data_dir=DIR[&manual_dir=DIR_WITH_aclImdb_v1.tar.gz]"
        )
    return out


def _tfds_records(spec: str) -> Iterator[tuple[dict, Location]]:
    import tensorflow_datasets as tfds

    s = parse_tfds_spec(spec)
    if s.get("manual_dir"):
        if s["name"].split("/")[0].split(":")[0] != "imdb_reviews":
            raise ValueError(f"{spec!r}: manual_dir= prepares imdb_reviews only")
        prepare_imdb_reviews(s["manual_dir"], s["data_dir"])
    try:
        source = tfds.data_source(s["name"], split=s["split"], data_dir=s["data_dir"])
    except Exception as e:  # not prepared, wrong split, tfrecord-only data, ...
        raise ValueError(
            f"{spec!r}: cannot read the TFDS dataset ({type(e).__name__}: {e}); it must be "
            "prepared as array_record in data_dir (add manual_dir= with aclImdb_v1.tar.gz to "
            "prepare imdb_reviews)"
        ) from e
    where = f"tfds {s['name']}/{s['split']}"
    for i in range(len(source)):
        location = Location(where, i, "record")
        # Text features come back as UTF-8 bytes.
        yield sources.decode_record(source[i], location), location


def prepare_imdb_reviews(manual_dir: str | os.PathLike, data_dir: str | os.PathLike):
    """Prepares TFDS `imdb_reviews` (train, test, unsupervised) as array_record in
    `data_dir` from `manual_dir/aclImdb_v1.tar.gz`, offline and without TensorFlow; reuses
    a prepared `data_dir`. Returns the builder.

    The tarball must be the original (TFDS checks its registered size and sha256). TFDS's
    own builder does the work; two of its lookups are routed around TensorFlow and around
    `importlib_resources` (an optional etils dependency), see `_imdb_builder_class`.
    """
    import tensorflow_datasets as tfds

    manual_dir = os.fspath(manual_dir)
    tarball = os.path.join(manual_dir, "aclImdb_v1.tar.gz")
    prepared = os.path.join(os.fspath(data_dir), "imdb_reviews", "plain_text")
    if not os.path.exists(tarball) and not os.path.isdir(prepared):
        raise FileNotFoundError(f"{tarball}: no such file (the original IMDb archive)")
    builder = _imdb_builder_class()(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


class _PythonArchives:
    """A TFDS download manager whose `iter_archive` opens the file with Python's `open`
    (TFDS opens paths with `tf.io.gfile`, i.e. TensorFlow); the rest is delegated."""

    def __init__(self, dl_manager):
        self._dl_manager = dl_manager

    def __getattr__(self, name):
        return getattr(self._dl_manager, name)

    def iter_archive(self, path) -> Iterable:
        from tensorflow_datasets.core.download import extractor

        with open(os.fspath(path), "rb") as f:
            # TFDS's tar walk on an open file object: same member paths as its own.
            yield from extractor.iter_tar(f)


@functools.cache
def _imdb_builder_class():
    """TFDS's `imdb_reviews` builder, unchanged except for where it looks for its files.

    `code_path` / `pkg_dir_path` point at TFDS's module (its checksums.tsv, README), where
    TFDS would find them through `importlib_resources`; `_split_generators` hands the stock
    one a download manager that reads the archive without TensorFlow. Same name, config,
    version, features and examples: the prepared directory is the one `tfds.data_source`
    reads as "imdb_reviews".
    """
    from etils import epath
    from tensorflow_datasets.core import utils as tfds_utils
    from tensorflow_datasets.datasets.imdb_reviews import imdb_reviews_dataset_builder as imdb

    stock_file = epath.Path(inspect.getfile(imdb.Builder))

    class ImdbReviews(imdb.Builder, skip_registration=True):
        name = "imdb_reviews"
        pkg_dir_path = stock_file.parent

        @tfds_utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            return stock_file

        def _split_generators(self, dl_manager):
            return super()._split_generators(_PythonArchives(dl_manager))

    return ImdbReviews
