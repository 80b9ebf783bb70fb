"""Run identity: a workdir holds one run, and a rerun must be that same run.

The first start of a run writes `<workdir>/run.json` (the run identity, below) and
`<workdir>/config.json` (the resolved config, for people and tools). Every later start in
the same workdir recomputes the identity and compares (`claim`):

- settings that determine the result differ: the run stops with `WorkdirError`, listing
  each differing key `old -> new`. A new `--workdir` starts a separate run;
  `--allow_config_change` continues this run's checkpoints under the new settings (the
  change is recorded in run.json, and the run is then no longer reproducible from one
  config).
- only operational settings differ (`OPERATIONAL_KEYS`: logging, checkpoint and
  evaluation frequency, parallelism, where the inputs live): the run resumes, the
  differences are logged, config.json is rewritten and run.json records the change. They
  change when and where things happen, not what the run computes, so refusing them would
  only get in the way of resuming on another machine or mesh.
- a workdir written before run identities existed (checkpoints or metrics, no run.json)
  is refused unless `--allow_config_change` adopts it: nothing tells which config made it.

The identity covers: every config key except the operational ones; the model directory
(`model.hf_path`: config.json, the safetensors index, and each weight file's name, size,
header and 16 sampled 64 KiB blocks of its data, not the whole multi-GB content); the
tokenizer directory (its tokenizer, vocabulary, merges and chat-template files); the data
(content sha256 of each train/eval/sft file after glob expansion, or of every file of a
saved HF dataset directory; for `data.tfds_name`: the builder version and the content of
the manual files it is prepared from, else of the prepared array_record files of the used
splits, or only their names and sizes past 2 GiB). Presets and synthetic data are fully
described by the config (preset name, overrides, seed, sizes).

Not covered: the code (dpo_jax, jax, XLA versions: the same config under new code may
differ numerically); the machine type; weight bytes outside the sampled blocks; TFDS
array_record files past 2 GiB rewritten at the same size. New config keys added by a code
update count as unchanged when their value is the default of `defaults.base_config()`.

`params_fingerprint` and `pairs_fingerprint` are content checksums for caches keyed by what
they were computed from (the cached reference log-probs).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
FORMAT = 1

# Dotted config keys (and everything under them) that do not change what a run computes.
OPERATIONAL_KEYS = (
    "log",  # frequency, progress bar, W&B project
    "checkpoint.every_steps",  # a resumed run continues the same steps exactly
    "checkpoint.keep",
    "checkpoint.async_save",
    "eval.every_steps",  # evaluation reads the params, never changes them
    "eval.max_batches",
    "export_hf",
    "parallel",  # a sharded run equals a one-device run (tests/test_loop.py, test_multihost)
    "sweep",  # the member's overrides are applied to the config, so they are covered
    # Where the inputs live: their content is in identity.model/tokenizer/data, so a run
    # may resume with its files moved (another mount, another machine).
    "model.hf_path",
    "data.tokenizer",
    "data.train_files",
    "data.eval_files",
    "data.sft_files",
    "data.tfds_data_dir",
    "data.tfds_manual_dir",
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".ckpt")
_TOKENIZER_FILE_LIMIT = 64 << 20
# tokenizer.json, tokenizer_config.json, vocab.*, merges.txt, spiece.model, chat templates...
_TOKENIZER_FILES = re.compile(
    r"token|vocab|merges|spiece|sentencepiece|chat_template|\.model$|\.tiktoken$"
)
_TFDS_CONTENT_LIMIT = 2 << 30
_SAMPLED_BLOCKS, _BLOCK = 16, 64 << 10
_CHUNK = 8 << 20


class WorkdirError(Exception):
    """A workdir that cannot be used as asked. The message says what and how to proceed;
    the command line prints it without a traceback."""


# ------------------------------------------------------------------------------------------
# Identity
# ------------------------------------------------------------------------------------------


def is_operational(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in OPERATIONAL_KEYS)


def flat_config(config) -> dict[str, Any]:
    """{dotted.key: JSON value} of the resolved config (tuples as lists, as in config.json)."""
    return _flatten(json.loads(_config_json(config)))


def run_identity(config) -> dict[str, Any]:
    """{dotted.key: value} of everything that determines the result of `config`.

    The config's keys minus `OPERATIONAL_KEYS`, plus `identity.model`, `identity.tokenizer`
    and `identity.data.*` content hashes (see the module docstring for what they cover).
    Raises FileNotFoundError naming the config key when an input does not exist.
    """
    identity = {k: v for k, v in flat_config(config).items() if not is_operational(k)}
    model, data = config.model, config.data
    if model.hf_path:
        identity["identity.model"] = _model_hash(_existing_dir(model.hf_path, "model.hf_path"))
    tokenizer = data.tokenizer or model.hf_path
    if tokenizer and not data.synthetic:
        key = "data.tokenizer" if data.tokenizer else "model.hf_path"
        identity["identity.tokenizer"] = _tokenizer_hash(_existing_dir(tokenizer, key))
    if not data.synthetic:
        identity.update(_data_identity(config))
    return identity


def _config_json(config) -> str:
    if hasattr(config, "copy_and_resolve_references"):
        config = config.copy_and_resolve_references()
    return config.to_json_best_effort(indent=2, sort_keys=True)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted + "."))  # an empty dict adds no key
        else:
            flat[dotted] = value
    return flat


def _existing_dir(path: str, key: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.{key}={path!r}: no such directory")
    return path


def _model_hash(directory: str) -> str:
    h = hashlib.sha256()
    names = sorted(os.listdir(directory))
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name == "config.json" or name.endswith(".index.json"):
            h.update(f"{name}\0".encode())
            h.update(_sha256_file(path).encode())
        elif name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"{name}\0{os.path.getsize(path)}\0".encode())
            h.update(_weight_file_digest(path))
    return h.hexdigest()


def _weight_file_digest(path: str) -> bytes:
    """The safetensors header (names, dtypes, shapes, offsets) plus sampled data blocks:
    two fine-tunes of one architecture share the header but not the sampled bytes."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        head = f.read(8)
        if path.endswith(".safetensors") and len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= min(size - 8, 100 << 20):
                h.update(f.read(n))
                start = 8 + n
        span = max(size - start, 0)
        for i in range(_SAMPLED_BLOCKS):
            f.seek(start + span * i // _SAMPLED_BLOCKS)
            h.update(f.read(_BLOCK))
    return h.digest()


def _tokenizer_hash(directory: str) -> str:
    """The tokenizer's own files only: a model directory's README or weights may change
    without changing the tokenization."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if (os.path.isfile(path) and _TOKENIZER_FILES.search(name)
                and not name.endswith(_WEIGHT_SUFFIXES)
                and os.path.getsize(path) <= _TOKENIZER_FILE_LIMIT):  # fmt: skip
            h.update(f"{name}\0{_sha256_file(path)}\0".encode())
    return h.hexdigest()


def _data_identity(config) -> dict[str, Any]:
    from dpo_jax.data import sources  # the same glob expansion as the data loader

    data = config.data
    identity = {}
    used = {"train_files": data.train_files, "eval_files": data.eval_files}
    if "sft" in config.stages:
        used["sft_files"] = data.sft_files
    for key, files in used.items():
        if not files:
            continue
        try:
            paths = sources.expand_paths(files if isinstance(files, str) else list(files))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"config.data.{key}: {err}") from None
        identity[f"identity.data.{key}"] = [_sha256_path(p) for p in paths]
    if data.tfds_name and not data.train_files:
        identity.update(_tfds_identity(data))
    return identity


def _tfds_identity(data) -> dict[str, Any]:
    import tensorflow_datasets as tfds

    from dpo_jax.data import tfds_builders  # noqa: F401 - registers our builders

    kwargs = {"data_dir": data.tfds_data_dir} if data.tfds_data_dir else {}
    builder = tfds.builder(data.tfds_name, file_format="array_record", **kwargs)
    identity = {"identity.data.tfds_version": str(builder.version)}
    if data.tfds_manual_dir:
        # The source of truth: the prepared files are a function of these and the version,
        # and they exist before the first preparation.
        directory = _existing_dir(data.tfds_manual_dir, "data.tfds_manual_dir")
        identity["identity.data.tfds_manual_files"] = _sha256_path(directory)
        return identity
    splits = {s.split("[")[0] for s in (data.tfds_train_split, data.tfds_eval_split) if s}
    splits = {part for s in splits for part in s.split("+")}
    directory = os.fspath(builder.data_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"config.data.tfds_name={data.tfds_name!r}: not prepared in {directory}; set "
            "config.data.tfds_manual_dir to prepare it from local files"
        )
    prefix = tuple(f"{builder.name}-{s}." for s in sorted(splits))
    paths = [os.path.join(directory, f) for f in sorted(os.listdir(directory))
             if f.startswith(prefix)]  # fmt: skip
    # Past the limit, names and sizes: hashing terabytes at every start costs too much.
    small = sum(os.path.getsize(p) for p in paths) <= _TFDS_CONTENT_LIMIT
    digest = _sha256_file if small else os.path.getsize
    identity["identity.data.tfds_files"] = {os.path.basename(p): digest(p) for p in paths}
    return identity


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_path(path: str) -> str:
    """A file's content sha256; a directory's over its files' relative names and contents."""
    if not os.path.isdir(path):
        return _sha256_file(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(f"{os.path.relpath(full, path)}\0{_sha256_file(full)}\0".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Claiming a workdir
# ------------------------------------------------------------------------------------------


def claim(workdir: str, config, *, allow_config_change: bool = False) -> None:
    """Makes `workdir` the home of the run `config` describes, or refuses (WorkdirError).

    First start: writes run.json and config.json. Rerun: compares identities (see the
    module docstring). Every process computes and compares; process 0 writes, atomically.
    Call it before anything is written to the workdir or any data is generated.
    """
    workdir = os.path.abspath(workdir)
    identity, error, record = {}, None, None
    try:
        identity = run_identity(config)
        record = _updated_record(workdir, identity, flat_config(config), allow_config_change)
    except Exception as err:  # noqa: BLE001 - raised below, after the other processes know
        error = err
    if jax.process_count() > 1:
        error = _agree(identity, error)
        # Everyone has read the old files before process 0 replaces them.
        multihost_utils.sync_global_devices("workdir claim: compared")
    if error is not None:
        raise error
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        _write_atomically(os.path.join(workdir, RUN_FILE), json.dumps(record, indent=2) + "\n")
        _write_atomically(os.path.join(workdir, CONFIG_FILE), _config_json(config))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("workdir claim: written")


def _updated_record(workdir, identity, flat, allow_config_change) -> dict:
    """The run.json to write, after logging what changed; raises WorkdirError to refuse."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = _read_json(os.path.join(workdir, RUN_FILE), "run identity")
    if record is None:
        if _holds_a_run(workdir) and not allow_config_change:
            raise WorkdirError(
                f"{workdir} holds checkpoints or metrics of a run started before run "
                f"identities were recorded (no {RUN_FILE}), so nothing tells whether they "
                "belong to this config. Pass a new --workdir to start a separate run, or "
                "--allow_config_change to continue them under this config."
            )
        changes = [{"time": now, "adopted": True}] if _holds_a_run(workdir) else []
        return {"format": FORMAT, "created": now, "identity": identity, "changes": changes}
    old_identity = record.get("identity", {})
    differing = _differences(old_identity, identity)
    old_flat = _flatten(_read_json(os.path.join(workdir, CONFIG_FILE), "config") or {})
    operational = {k: d for k, d in _differences(old_flat, flat, defaults=False).items()
                   if is_operational(k)}  # fmt: skip
    if differing and not allow_config_change:
        raise WorkdirError(_refusal(workdir, differing, operational))
    if differing:
        log.warning("%s: continuing the run under changed settings (--allow_config_change):\n%s",
                    workdir, _listing(differing))  # fmt: skip
    if operational:
        log.warning("%s: operational settings changed (the run resumes):\n%s",
                    workdir, _listing(operational))  # fmt: skip
    if differing or operational:
        changes = {k: list(d) for k, d in {**operational, **differing}.items()}
        record.setdefault("changes", []).append(
            {"time": now, "allowed": bool(differing), "keys": changes}
        )
    record["identity"] = identity
    return record


_ABSENT = "<absent>"


def _differences(old: Mapping, new: Mapping, *, defaults: bool = True) -> dict[str, tuple]:
    """{key: (old, new)} of keys whose values differ. With `defaults`, a key only in `new`
    whose value is base_config()'s default is no difference (a key added by a code update
    that keeps the old behaviour)."""
    default = {}
    if defaults and any(k not in old for k in new):
        from dpo_jax.train.defaults import base_config

        default = flat_config(base_config())
    out = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before == after:
            continue
        if key not in old and key in default and default[key] == after:
            continue
        out[key] = (before, after)
    return out


def _refusal(workdir, differing, operational) -> str:
    lines = [
        f"{workdir} holds another run: {len(differing)} setting(s) that determine the result "
        "differ from the ones it was started with:",
        _listing(differing),
    ]
    if operational:
        lines += ["(operational settings that also changed, allowed on their own:)",
                  _listing(operational)]  # fmt: skip
    lines.append(
        "Pass a new --workdir to start a separate run; or pass --allow_config_change to "
        f"continue this run's checkpoints under the new settings (recorded in {RUN_FILE})."
    )
    return "\n".join(lines)


def _listing(differences: Mapping[str, tuple]) -> str:
    def show(value):
        text = value if value == _ABSENT else json.dumps(value, sort_keys=True)
        return text if len(text) <= 100 else text[:97] + "..."

    return "\n".join(
        f"  {_describe(k)}: {show(old)} -> {show(new)}" for k, (old, new) in differences.items()
    )


_DESCRIPTIONS = {
    "identity.model": "content of config.model.hf_path",
    "identity.tokenizer": "content of the tokenizer directory",
    "identity.data.train_files": "content of config.data.train_files",
    "identity.data.eval_files": "content of config.data.eval_files",
    "identity.data.sft_files": "content of config.data.sft_files",
    "identity.data.tfds_manual_files": "content of config.data.tfds_manual_dir",
    "identity.data.tfds_files": "prepared files of config.data.tfds_name",
    "identity.data.tfds_version": "version of the config.data.tfds_name builder",
}


def _describe(key: str) -> str:
    if key in _DESCRIPTIONS:
        return f"{key} ({_DESCRIPTIONS[key]})"
    return key if key.startswith("identity.") else f"config.{key}"


def _holds_a_run(workdir: str) -> bool:
    """Whether `workdir` holds checkpoint steps or metrics of some run."""
    if os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return True
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        return False
    for stage in os.listdir(checkpoints):
        stage_dir = os.path.join(checkpoints, stage)
        if os.path.isdir(stage_dir) and any(n.isdigit() for n in os.listdir(stage_dir)):
            return True
    return False


def _read_json(path: str, what: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise WorkdirError(
            f"{path}: cannot read the {what} of the run in this workdir ({err}). Pass a new "
            "--workdir, or repair or remove the file."
        ) from None


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _agree(identity: dict, error: Exception | None) -> Exception | None:
    """Multi-host: every process refuses if any does, or if the processes see different
    inputs (a process that went on alone would wait for the others forever)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()
    mine = np.frombuffer(digest[:8], np.uint32).copy()
    mine = np.append(mine, np.uint32(error is not None))
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    if error is not None:
        return error
    if everyone[:, 2].any():
        bad = int(np.flatnonzero(everyone[:, 2])[0])
        return WorkdirError(f"process {bad} could not claim the workdir (its log says why)")
    differs = np.flatnonzero((everyone[:, :2] != everyone[0, :2]).any(axis=1))
    if differs.size:
        return WorkdirError(
            f"process {int(differs[0])} sees other inputs (model, tokenizer or data files) "
            "than process 0; every host must read the same files"
        )
    return None


# ------------------------------------------------------------------------------------------
# Content fingerprints
# ------------------------------------------------------------------------------------------


def params_fingerprint(params: Any) -> str:
    """A sha256 hex digest of a params pytree's paths, shapes, dtypes and contents.

    Computed where the params live (sharded, multi-host): per leaf, two position-dependent
    32-bit hashes of the raw bits, summed modulo 2**32. Integer sums do not depend on the
    order of reduction, so the fingerprint is the same on every mesh and device count;
    only 16 bytes per leaf come to the host. Pass unreplicated params (not pmap copies).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    if not leaves:
        return hashlib.sha256(b"empty").hexdigest()
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    arrays = [leaf for _, leaf in leaves]
    sums = _to_host(_leaf_checksums(arrays))
    h = hashlib.sha256()
    for path, array, row in zip(paths, arrays, sums, strict=True):
        h.update(f"{path}\0{tuple(np.shape(array))}\0{jnp.dtype(array.dtype).name}\0".encode())
        h.update(np.asarray(row, "<u4").tobytes())
    return h.hexdigest()


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_uint32(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size < 4:
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a last axis of 2


@jax.jit
def _leaf_checksums(arrays: list) -> jax.Array:
    rows = []
    for x in arrays:
        bits = _as_uint32(jnp.asarray(x))
        index = jnp.zeros(bits.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(bits.ndim)):
            iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
            index = index + iota * jnp.uint32(stride & 0xFFFFFFFF)
            stride *= bits.shape[axis]
        a = _mix(bits ^ _mix(index * jnp.uint32(2) + jnp.uint32(1)))
        b = _mix(bits + _mix(index ^ jnp.uint32(0x9E3779B9)))
        rows.append(jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)]))
    return jnp.stack(rows)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def pairs_fingerprint(pairs: Sequence, extra: Mapping[str, Any] | None = None) -> str:
    """A sha256 hex digest of tokenized pairs (their prompt, chosen and rejected token ids,
    in order) and `extra` (scoring options, e.g. max_length, memory_efficient)."""
    h = hashlib.sha256(f"{len(pairs)}\0".encode())
    h.update(json.dumps(dict(extra or {}), sort_keys=True, default=str).encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            h.update(_length_prefixed(ids))
    return h.hexdigest()


def _length_prefixed(ids: Iterable[int]) -> bytes:
    array = np.asarray(ids, "<i8")
    return struct.pack("<Q", array.size) + array.tobytes()
