"""TFDS builders for preference data, written as `array_record` without TensorFlow.

Two builders, both reading local files from a manual directory (nothing is downloaded):

  `preference_files`  JSON / JSONL(.gz) / parquet preference records of any text format
                      that `formats.parse_preference` knows (standard, implicit prompt, HH).
                      Default config: every file in the manual dir whose name starts with a
                      split name ("train.jsonl", "test-00000-of-00002.parquet", ...).
  `hh_rlhf`           the official Anthropic HH-RLHF files
                      `{helpful-base,harmless-base,helpful-online,helpful-rejection-sampled}/
                      {train,test}.jsonl.gz`. Configs: "all" (the four subsets, as in the DPO
                      paper), one per subset ("helpful_base", ...), each also as "*_raw"
                      (the two full transcripts, no prompt split).

The no-TensorFlow path: tensorflow-datasets 4.9 generates and reads `array_record` files
through `array_record` + numpy only (`FeaturesDict.serialize_example` /
`deserialize_example_np`); TensorFlow is imported only by `as_dataset` and the tfrecord
format. So the builders default to `file_format="array_record"`, and the data is read back
with `tfds.data_source` (random access, what grain wants), never with `tfds.load`:

    from dpo_jax.data import tfds_builders  # registers the builders
    tfds_builders.prepare("hh_rlhf/helpful_base", manual_dir=HH_DIR, data_dir=DATA_DIR)
    train = tfds.data_source("hh_rlhf/helpful_base", split="train", data_dir=DATA_DIR)
    train[0]  # {"prompt": b"...", "chosen": b"...", "rejected": b"..."}

Text features come back as UTF-8 `bytes`; `sources.decode_record` turns them into str.
Example order on disk follows the input files (`disable_shuffling`), so record i of a split
is reproducible; the training pipeline shuffles by seed.

Bad records follow each config's `on_bad_record`: "raise" stops generation with an error
naming the file, line and field; "skip" drops them, logs a one-line summary and stores the
counts per split in the dataset's metadata (`builder.info.metadata["bad_records"]`).
HH configs skip by default: the public files hold a few pairs the HH rule cannot split
(e.g. a rejected transcript whose dialogue history differs from the chosen one).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from dpo_jax.data.examples import BadRecordCounter, OnBadRecord, RecordError, check_on_bad_record
from dpo_jax.data.formats import PREFERENCE_FORMATS
from dpo_jax.data.sources import (
    SOURCE_FORMATS,
    detect_source_format,
    expand_paths,
    iter_examples,
    iter_records,
    parse_records,
)

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_SPLITS = ("train", "test")
# Extensions `preference_files` discovers in its manual dir (gzip allowed for JSON text).
_DISCOVERED = re.compile(
    r"^([A-Za-z0-9_]+)(?:[-.].*)?\.(?:jsonl|ndjson|json)(?:\.gz)?$|"
    r"^([A-Za-z0-9_]+)(?:[-.].*)?\.(?:parquet|pq)$"
)


def _text_features(names: Sequence[str]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({name: tfds.features.Text() for name in names})


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: array_record by default, bad-record counts kept in the metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' own lookup goes through `importlib_resources` (an etils[epath] extra that
        # some installs lack) only to find a checksums file; these builders have none.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format: str | None = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _make_info(self, features: tfds.features.FeaturesDict, description: str):
        # `dataset_info_from_configs` would look for README/CITATIONS files next to this
        # module; a plain DatasetInfo needs none.
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=features,
            metadata=tfds.core.MetadataDict(),
            # Keep file order: record i of a split is then record i of its files.
            disable_shuffling=True,
        )

    def _counter(self, split: str) -> BadRecordCounter:
        counter = BadRecordCounter(self.builder_config.on_bad_record, name=f"{self.name}/{split}")
        self._counters[split] = counter
        return counter

    def _download_and_prepare(self, dl_manager, download_config=None):
        self._counters: dict[str, BadRecordCounter] = {}
        super()._download_and_prepare(dl_manager, download_config)
        # The metadata is written to disk after this returns, so the counts are kept.
        self.info.metadata["bad_records"] = {
            split: {"kept": c.num_ok, "skipped": c.summary()}
            for split, c in sorted(self._counters.items())
        }
        for c in self._counters.values():
            c.log_summary()


# ----------------------------------------------------------------------------------------
# preference_files
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PreferenceFilesConfig(tfds.core.BuilderConfig):
    """Which files make which split, and how to read them.

    data_files: split name -> paths or glob patterns (relative ones are taken from the
      manual dir). None: discover `<split>[-.]*.{jsonl,json,parquet}[.gz]` in the manual dir.
    source_format: one of sources.SOURCE_FORMATS, or None to guess from each file name.
    record_format: "auto" or a text preference format ("standard", "implicit_prompt", "hh").
      Conversational (message list) records need a tokenizer's chat template and are not
      supported here: keep them in files (`config.data.train_files`), parsed with the
      run's tokenizer.
    on_bad_record: "raise" or "skip" (see the module docstring).
    """

    data_files: Mapping[str, Sequence[str]] | None = None
    source_format: str | None = None
    record_format: str = "auto"
    on_bad_record: OnBadRecord = "raise"

    def __post_init__(self):
        check_on_bad_record(self.on_bad_record)
        if self.source_format is not None and self.source_format not in SOURCE_FORMATS:
            raise ValueError(
                f"source_format must be None or one of {SOURCE_FORMATS}, got {self.source_format!r}"
            )
        allowed = ("auto",) + tuple(f for f in PREFERENCE_FORMATS if f != "conversational")
        if self.record_format not in allowed:
            raise ValueError(f"record_format must be one of {allowed}, got {self.record_format!r}")


class PreferenceFiles(_LocalFilesBuilder):
    """Preference pairs (prompt, chosen, rejected) from local JSON / JSONL / parquet files."""

    BUILDER_CONFIGS = [PreferenceFilesConfig(name="default", description="Splits from file names.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the record files in the manual dir, named after their split (train.jsonl, "
        "test.jsonl.gz, validation-00000-of-00001.parquet, ...), or pass a "
        "PreferenceFilesConfig(name=..., data_files={split: [paths or globs]})."
    )

    def _info(self):
        return self._make_info(
            _text_features(("prompt", "chosen", "rejected")),
            "Preference pairs read from local files.",
        )

    def _split_files(self, manual_dir: str) -> dict[str, list[str]]:
        cfg = self.builder_config
        if cfg.data_files is not None:
            out = {}
            for split, patterns in cfg.data_files.items():
                if isinstance(patterns, (str, os.PathLike)):
                    patterns = [patterns]
                out[split] = expand_paths(
                    [p if os.path.isabs(p) else os.path.join(manual_dir, p) for p in patterns]
                )
            return out
        out: dict[str, list[str]] = {}
        for name in sorted(os.listdir(manual_dir)):
            m = _DISCOVERED.match(name)
            if m and os.path.isfile(os.path.join(manual_dir, name)):
                out.setdefault(m.group(1) or m.group(2), []).append(os.path.join(manual_dir, name))
        if not out:
            raise FileNotFoundError(
                f"{manual_dir}: no record files named <split>.jsonl / .json / .parquet [.gz]"
            )
        return out

    def _split_generators(self, dl_manager):
        files = self._split_files(os.fspath(dl_manager.manual_dir))
        return {split: self._generate_examples(split, paths) for split, paths in files.items()}

    def _generate_examples(self, split: str, paths: list[str]):
        cfg = self.builder_config
        counter = self._counter(split)
        for path in paths:
            fmt = cfg.source_format or detect_source_format(path)
            examples = iter_examples(
                [path], record_format=cfg.record_format, source_format=fmt, counter=counter
            )
            for ex, loc in examples:
                yield f"{path}:{loc.index}", _texts(ex)


# ----------------------------------------------------------------------------------------
# hh_rlhf
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class HhRlhfConfig(tfds.core.BuilderConfig):
    """Which HH-RLHF subsets to merge and whether to split prompts off the transcripts.

    subsets: directories of the official release (see HH_SUBSETS), concatenated in order.
    split_prompt: True -> prompt/chosen/rejected by the HH rule (prompt = the chosen
      transcript up to and including its last "\\n\\nAssistant:", see
      `formats.extract_anthropic_prompt`); False -> the raw chosen/rejected transcripts.
    on_bad_record: "raise" or "skip" (see the module docstring).
    """

    subsets: tuple[str, ...] = HH_SUBSETS
    split_prompt: bool = True
    on_bad_record: OnBadRecord = "skip"

    def __post_init__(self):
        check_on_bad_record(self.on_bad_record)
        unknown = [s for s in self.subsets if s not in HH_SUBSETS]
        if unknown or not self.subsets:
            raise ValueError(
                f"HH subsets must be a non-empty subset of {HH_SUBSETS}, got {unknown}"
            )


def _hh_configs() -> list[HhRlhfConfig]:
    groups = [("all", HH_SUBSETS)] + [(s.replace("-", "_"), (s,)) for s in HH_SUBSETS]
    configs = []
    for name, subsets in groups:
        for split_prompt, suffix in ((True, ""), (False, "_raw")):
            what = "prompt/chosen/rejected" if split_prompt else "raw transcripts"
            configs.append(
                HhRlhfConfig(
                    name=name + suffix,
                    description=f"{', '.join(subsets)}: {what}.",
                    subsets=subsets,
                    split_prompt=split_prompt,
                )
            )
    return configs


class HhRlhf(_LocalFilesBuilder):
    """Anthropic HH-RLHF (Bai et al. 2022, arXiv 2204.05862) from the official jsonl.gz files."""

    BUILDER_CONFIGS = _hh_configs()
    DEFAULT_CONFIG_NAME = "all"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Clone or download https://github.com/anthropics/hh-rlhf and point the manual dir at "
        "its root: it must hold <subset>/train.jsonl.gz and <subset>/test.jsonl.gz for the "
        f"config's subsets {HH_SUBSETS}."
    )

    def _info(self):
        names = (
            ("prompt", "chosen", "rejected")
            if self.builder_config.split_prompt
            else (
                "chosen",
                "rejected",
            )
        )
        return self._make_info(
            _text_features(names),
            "Anthropic HH-RLHF human preference pairs (helpfulness / harmlessness).",
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        files = {}
        for split in HH_SPLITS:
            files[split] = [
                os.path.join(root, s, f"{split}.jsonl.gz") for s in self.builder_config.subsets
            ]
            missing = [p for p in files[split] if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"HH-RLHF file(s) missing: {missing}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
                )
        return {split: self._generate_examples(split, paths) for split, paths in files.items()}

    def _generate_examples(self, split: str, paths: list[str]):
        counter = self._counter(split)
        split_prompt = self.builder_config.split_prompt
        for path in paths:
            subset = os.path.basename(os.path.dirname(path))
            records = iter_records([path], source_format="jsonl", counter=counter)
            if split_prompt:
                for ex, loc in parse_records(records, record_format="hh", counter=counter):
                    yield f"{subset}/{split}/{loc.index}", _texts(ex)
                continue
            for record, loc in records:
                try:
                    example = _raw_transcripts(record, loc)
                except RecordError as err:
                    counter.handle(err)
                    continue
                counter.ok()
                yield f"{subset}/{split}/{loc.index}", example


def _texts(example) -> dict[str, str]:
    return {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}


def _raw_transcripts(record, loc) -> dict[str, str]:
    """The two transcripts of an HH record, checked to be non-empty strings."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"expected an object, got {type(record).__name__}").at(
            loc
        )
    out = {}
    for field in ("chosen", "rejected"):
        value = record.get(field)
        if value is None:
            raise RecordError("missing_field", "missing field", field=field).at(loc)
        if not isinstance(value, str) or not value:
            raise RecordError(
                "bad_type", f"expected a non-empty string, got {value!r:.60}", field=field
            ).at(loc)
        out[field] = value
    return out


def prepare(
    name: str,
    *,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    config: tfds.core.BuilderConfig | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds `name` ("hh_rlhf/helpful_base", "preference_files", ...) as array_record.

    Reuses the prepared data when `data_dir` already holds it. `config` overrides the
    config named in `name` (e.g. a `PreferenceFilesConfig` with explicit data_files).
    Read it back with `tfds.data_source(name, split=..., data_dir=data_dir)` (use
    "preference_files/<config.name>" for a custom config).
    """
    kwargs = {"data_dir": os.fspath(data_dir), "file_format": "array_record"}
    if config is not None:
        kwargs["config"] = config
        name = name.split("/")[0]
    builder = tfds.builder(name, **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder
