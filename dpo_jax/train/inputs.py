"""The run's data: files (or the generated toy set) -> parsed, tokenized splits -> iterators.

Records are parsed and tokenized once, up front, with their file and line: a bad record
stops the run before the first step with an error that names it (or, with
`on_bad_record="skip"`, is counted and summarised), instead of surfacing mid-run. The
grain pipeline then only shuffles, shards and batches the tokenized items, so its
checkpointed state is a stream position.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import ml_collections

from dpo_jax.data import pipeline, sources, synthetic
from dpo_jax.data.examples import (
    BadRecordCounter,
    Location,
    RecordError,
    SFTExample,
    TokenizedPair,
    TokenizedSequence,
    UnpairedExample,
)
from dpo_jax.data.tokenize import (
    TokenizeConfig,
    TokenizeStats,
    load_tokenizer,
    pad_id_of,
    tokenize_examples,
)
from dpo_jax.train.validate import batch_shards, unpaired

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Splits:
    """Tokenized data of a run.

    pairs / eval_pairs: the DPO stage's items (train / held out): preference pairs, or
      `TokenizedUnpaired` examples when `unpaired` (an unpaired loss such as KTO).
    sequences: SFT targets (prompt + chosen response, or + desirable completion) of the
      training records.
    bad_records: skipped records per reason (`RecordError.reason`), all splits together;
      empty unless `config.data.on_bad_record = "skip"` skipped some.
    tokenize_events: counts of tokenization events per name (e.g. "prompt_truncated",
      "response_truncated"; `tokenize.TokenizeStats`), all splits together.
    """

    tokenizer: object
    tokenize_config: TokenizeConfig
    pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    sequences: list[TokenizedSequence]
    bad_records: dict[str, int] = dataclasses.field(default_factory=dict)
    tokenize_events: dict[str, int] = dataclasses.field(default_factory=dict)
    unpaired: bool = False


def generate_synthetic(data: ml_collections.ConfigDict, seed: int, directory: str):
    """Writes the toy train/eval JSONL files and the char tokenizer (once; idempotent).

    Returns (train_files, eval_files, tokenizer_dir). Held-out pairs use a different seed
    than training pairs, so they are fresh prompts.
    """
    tokenizer_dir = os.path.join(directory, "tokenizer")
    train_path = os.path.join(directory, "train.jsonl")
    eval_path = os.path.join(directory, "eval.jsonl")
    if not os.path.exists(eval_path):
        n_eval = max(1, int(data.synthetic_size * data.eval_fraction))
        n_train = data.synthetic_size - n_eval
        synthetic.build_char_tokenizer(tokenizer_dir)
        synthetic.write_jsonl(synthetic.make_preference_records(n_train, seed), train_path)
        # Written last: its presence marks the directory complete.
        tmp = eval_path + ".tmp"
        synthetic.write_jsonl(synthetic.make_preference_records(n_eval, seed + 1), tmp)
        os.replace(tmp, eval_path)
    return (train_path,), (eval_path,), tokenizer_dir


def tfds_records(data: ml_collections.ConfigDict, split: str, counter: BadRecordCounter):
    """(record, location) of one split of the TFDS dataset `data.tfds_name` (array_record,
    read with `tfds.data_source`, no TensorFlow). Prepared first from `data.tfds_manual_dir`
    when given (a no-op when `data.tfds_data_dir` already holds it). Undecodable records
    are raised or counted by `counter`."""
    import tensorflow_datasets as tfds

    from dpo_jax.data import tfds_builders  # registers our builders (hh_rlhf, ...)

    if data.tfds_manual_dir:
        tfds_builders.prepare(
            data.tfds_name, manual_dir=data.tfds_manual_dir, data_dir=data.tfds_data_dir
        )
    source = tfds.data_source(data.tfds_name, split=split, data_dir=data.tfds_data_dir or None)
    where = f"tfds {data.tfds_name}/{split}"
    for i in range(len(source)):
        location = Location(where, i, "record")
        try:
            record = sources.decode_record(source[i], location)
        except RecordError as err:
            counter.handle(err)
            continue
        yield record, location


def _locations(config: ml_collections.ConfigDict, workdir: str):
    """(train files, held-out files, tokenizer directory) of the run (`validate` has checked
    that data and a tokenizer are configured)."""
    data = config.data
    if data.synthetic:
        return generate_synthetic(data, config.seed, os.path.join(workdir, "data"))
    tokenizer_dir = data.tokenizer or config.model.hf_path
    return tuple(data.train_files), tuple(data.eval_files), tokenizer_dir


@dataclasses.dataclass
class _Reader:
    """Parses and tokenizes records with one bad-record counter and one set of stats."""

    data: ml_collections.ConfigDict
    tokenizer: object
    tokenize_config: TokenizeConfig
    counter: BadRecordCounter
    stats: TokenizeStats = dataclasses.field(default_factory=TokenizeStats)

    def examples(self, files, tfds_split, kind="preference"):
        """Parsed (example, location) of files, or else of a TFDS split (None: neither)."""
        parse = dict(
            kind=kind,
            record_format=self.data.format,
            tokenizer=self.tokenizer,
            counter=self.counter,
            count_ok=False,
        )
        if files:
            return list(sources.iter_examples(files, **parse))
        if self.data.tfds_name and tfds_split:
            records = tfds_records(self.data, tfds_split, self.counter)
            return list(sources.parse_records(records, **parse))
        return None

    def tokenize(self, examples):
        return [
            t
            for t, _ in tokenize_examples(
                examples, self.tokenizer, self.tokenize_config, self.counter, self.stats
            )
        ]

    def report(self) -> None:
        if self.counter.counts:
            self.counter.log_summary()
        if self.stats.counts:
            self.stats.log_summary(self.tokenize_config)


def data_tokenize_config(data: ml_collections.ConfigDict) -> TokenizeConfig:
    """How a run tokenizes and truncates its records, from its `config.data`."""
    return TokenizeConfig(
        mode=data.tokenize_mode,
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        truncation_mode=data.truncation_mode,
    )


def load_splits(config: ml_collections.ConfigDict, workdir: str) -> Splits:
    """Reads, parses and tokenizes the run's data as `config.data` says."""
    data = config.data
    train_files, eval_files, tokenizer_dir = _locations(config, workdir)
    tokenize_config = data_tokenize_config(data)
    counter = BadRecordCounter(data.on_bad_record, name="data")
    reader = _Reader(data, load_tokenizer(tokenizer_dir), tokenize_config, counter)
    if not {"dpo", "rm", "ppo"} & set(config.stages):  # rm, ppo: the pairs (ppo: prompts)
        return _sft_only_splits(config, reader, train_files)
    kind = "unpaired" if "dpo" in config.stages and unpaired(config) else "preference"
    examples = reader.examples(train_files, data.tfds_train_split, kind) or []
    eval_examples = reader.examples(eval_files, data.tfds_eval_split, kind)
    if eval_examples is None:
        # No held-out files: the last `eval_fraction` of the training records, never trained
        # on (by SFT either).
        n_eval = max(1, int(len(examples) * data.eval_fraction))
        examples, eval_examples = examples[:-n_eval], examples[-n_eval:]
    sequences = []
    if "sft" in config.stages:
        if data.sft_files:
            sft_examples = reader.examples(tuple(data.sft_files), None, kind="sft")
        else:  # the paper's recipe: fine-tune on the preferred responses
            sft_examples = [(sft_target(e), loc) for e, loc in examples if sft_target(e)]
        sequences = reader.tokenize(sft_examples)
    pairs, eval_pairs = reader.tokenize(examples), reader.tokenize(eval_examples)
    reader.report()
    what = "unpaired examples" if kind == "unpaired" else "pairs"
    if not pairs or not eval_pairs:
        raise ValueError(f"no usable {what}: {len(pairs)} train, {len(eval_pairs)} held out")
    log.info("Data: %d train %s, %d held out.", len(pairs), what, len(eval_pairs))
    return Splits(
        reader.tokenizer,
        tokenize_config,
        pairs,
        eval_pairs,
        sequences,
        bad_records=counter.summary(),
        tokenize_events=reader.stats.summary(),
        unpaired=kind == "unpaired",
    )


def _sft_only_splits(config, reader: _Reader, train_files) -> Splits:
    """The data of a run without a DPO stage: SFT targets only, no pairs. `parse_sft` reads
    {prompt, completion} records (e.g. plain texts) and takes the chosen side of preference
    records (Preferred-FT), so such a run trains on either kind of file."""
    data = config.data
    files = tuple(data.sft_files) or train_files
    examples = reader.examples(files, data.tfds_train_split, kind="sft") or []
    sequences = reader.tokenize(examples)
    reader.report()
    if not sequences:
        raise ValueError(f"no usable SFT sequences in {files or data.tfds_name}")
    log.info("Data: %d SFT sequences (no DPO stage: no pairs).", len(sequences))
    return Splits(
        reader.tokenizer,
        reader.tokenize_config,
        [],
        [],
        sequences,
        bad_records=reader.counter.summary(),
        tokenize_events=reader.stats.summary(),
    )


def sft_target(example) -> SFTExample | None:
    """The SFT target of a DPO-stage example: a pair's chosen response, an unpaired
    example's completion when desirable (None when undesirable)."""
    if isinstance(example, UnpairedExample):
        if not example.label:
            return None
        return SFTExample(example.prompt, example.completion, example.templated)
    return SFTExample(example.prompt, example.chosen, example.templated)


def iterator_spec(splits: Splits, config, **fields) -> pipeline.IteratorSpec:
    """The batching options of `config.data` for the run's tokenized splits; `fields` add to
    or replace them (batch size, seed, ...)."""
    data = config.data
    return pipeline.IteratorSpec(
        max_length=splits.tokenize_config.max_length,
        pad_id=pad_id_of(splits.tokenizer),
        pad_to_multiple_of=data.pad_to_multiple_of or None,
        **fields,
    )


def train_iterator(
    splits: Splits, config, stage: str, *, batch_size: int, seed: int, ref_logps=None
):
    """The endless, shuffled, process-sharded batch iterator of a stage ("sft" or "dpo").

    ref_logps: dpo only, optional cached reference sums [len(splits.pairs), 2]."""
    shared = stage != "sft" and config.data.layout == "packed_shared"
    spec = iterator_spec(
        splits,
        config,
        batch_size=batch_size,
        seed=seed,
        num_epochs=config.data.num_epochs or None,
        source_name=f"{stage} training data",
        **({} if stage == "sft" else {"layout": config.data.layout}),
        **({"num_rows": shared_rows(config, batch_size)} if shared else {}),
    )
    if stage == "sft":
        return pipeline.make_sft_iterator(splits.sequences, spec)
    if splits.unpaired:
        return pipeline.make_unpaired_iterator(splits.pairs, spec)
    return pipeline.make_preference_iterator(splits.pairs, spec, ref_logps=ref_logps)


def shared_rows(config, local_batch: int) -> int:
    """Rows R of this process's packed_shared batches (rows of 2 x max_length): ceil(B / 2),
    the token slots of the packed layout, rounded up to a multiple of what splits the rows:
    this process's batch shards and the micro-batches (`config.dpo.accum_steps`)."""
    multiple = math.lcm(batch_shards(config), int(config.dpo.accum_steps))
    rows = -(-local_batch // 2)
    return -(-rows // multiple) * multiple


def eval_iterator(splits: Splits, config, *, batch_size: int, ref_logps=None):
    """One pass over the held-out pairs in file order (last batch padded with pair_mask 0).

    ref_logps: optional cached reference sums [len(splits.eval_pairs), 2]."""
    spec = iterator_spec(
        splits,
        config,
        batch_size=batch_size,
        shuffle=False,
        num_epochs=1,
        source_name="held-out data",
    )
    if splits.unpaired:
        return pipeline.make_unpaired_iterator(splits.eval_pairs, spec)
    return pipeline.make_preference_iterator(splits.eval_pairs, spec, ref_logps=ref_logps)
