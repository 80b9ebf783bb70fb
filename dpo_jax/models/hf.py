"""Hugging Face checkpoint import (`from_hf`) and export (`to_hf`), safetensors only; reward
models as one-label `*ForSequenceClassification` (`from_hf_classifier`, `to_hf_classifier`).

Reads a local directory (config.json + model.safetensors or a sharded
model.safetensors.index.json) with safetensors' numpy API: no torch at run time.

Policy for tensors in the checkpoint that we do not use: known non-weight buffers (rotary
`inv_freq`, GPT-2 / GPT-NeoX causal-mask `attn.bias` / `masked_bias`) and a redundant
`lm_head.weight` of a tied model are ignored; any other leftover tensor is a real weight we
would silently drop, so it raises `HFCheckpointError` naming it.

Safety: the tensor files a shard index names must lie inside the model directory (no
"../", absolute paths or symlinks out of it; a hub-cache snapshot may link into its own
`blobs/`), and a truncated or corrupt file is an `HFCheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import DecoderLM, stack_layers, unstack_layers
from dpo_jax.models.hf_config import (
    HFCheckpointError,
    check_exportable,
    config_from_hf,
    config_to_hf,
)
from dpo_jax.models.reward import RewardModel, trunk_config

_IGNORED = re.compile(
    r"(rotary_emb\.inv_freq|(^|\.)attn\.(bias|masked_bias)|(^|\.)attention\.(bias|masked_bias))$"
)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor <-> one or more of our params (fused qkv splits into three)."""

    hf_name: str
    hf_shape: tuple[int, ...]
    paths: tuple[tuple[str, ...], ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    join: Callable[..., np.ndarray]


def _direct(hf_name, path, shape, hf_shape=None):
    hf_shape = tuple(hf_shape or shape)
    return _Entry(
        hf_name, hf_shape, (path,), lambda a: (a.reshape(shape),), lambda a: a.reshape(hf_shape)
    )


def _linear(hf_name, path, shape, n_in=1):
    """torch.nn.Linear weight [out, in] <-> our kernel [*in dims (n_in of them), *out dims]."""
    d_in = int(np.prod(shape[:n_in]))
    d_out = int(np.prod(shape[n_in:]))
    return _Entry(
        hf_name,
        (d_out, d_in),
        (path,),
        lambda a: (a.T.reshape(shape),),
        lambda a: a.reshape(d_in, d_out).T,
    )


def _llama_entries(cfg: ModelConfig) -> list[_Entry]:
    D, N, K, H, F, V = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
    )
    out = [
        _direct("model.embed_tokens.weight", ("embedding",), (V, D)),
        _direct("model.norm.weight", ("final_norm", "scale"), (D,)),
    ]
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", ("lm_head",), (D, V)))
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}.", f"layers_{i}"
        out += [
            _direct(hf + "input_layernorm.weight", (me, "attn_norm", "scale"), (D,)),
            _direct(hf + "post_attention_layernorm.weight", (me, "mlp_norm", "scale"), (D,)),
            _linear(hf + "self_attn.o_proj.weight", (me, "attn", "o_kernel"), (N, H, D), 2),
        ]
        for name, heads in (("q", N), ("k", K), ("v", K)):
            proj = f"{hf}self_attn.{name}_proj."
            out.append(_linear(proj + "weight", (me, "attn", f"{name}_kernel"), (D, heads, H)))
            if cfg.qkv_bias:
                bias_path = (me, "attn", f"{name}_bias")
                out.append(_direct(proj + "bias", bias_path, (heads, H), (heads * H,)))
        if cfg.out_bias:
            out.append(_direct(hf + "self_attn.o_proj.bias", (me, "attn", "o_bias"), (D,)))
        for name, shape in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
            out.append(_linear(f"{hf}mlp.{name}_proj.weight", (me, "mlp", f"{name}_kernel"), shape))
            if cfg.mlp_bias:
                bias_path = (me, "mlp", f"{name}_bias")
                out.append(_direct(f"{hf}mlp.{name}_proj.bias", bias_path, shape[-1:]))
    return out


def _layer_norm(hf_prefix, path, d):
    return [
        _direct(hf_prefix + ".weight", (*path, "scale"), (d,)),
        _direct(hf_prefix + ".bias", (*path, "bias"), (d,)),
    ]


def _gpt2_entries(cfg: ModelConfig, prefix: str) -> list[_Entry]:
    D, N, H, F, V = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    out = [
        _direct(prefix + "wte.weight", ("embedding",), (V, D)),
        _direct(prefix + "wpe.weight", ("pos_embedding",), (cfg.max_position_embeddings, D)),
        *_layer_norm(prefix + "ln_f", ("final_norm",), D),
    ]
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", ("lm_head",), (D, V)))
    for i in range(cfg.num_layers):
        hf, me = f"{prefix}h.{i}.", f"layers_{i}"
        qkv = tuple((me, "attn", f"{n}_kernel") for n in "qkv")
        qkv_b = tuple((me, "attn", f"{n}_bias") for n in "qkv")
        # HF Conv1D stores [in, out]; out is q|k|v, each head-major [N, H].
        out += [
            *_layer_norm(hf + "ln_1", (me, "attn_norm"), D),
            *_layer_norm(hf + "ln_2", (me, "mlp_norm"), D),
            _Entry(
                hf + "attn.c_attn.weight",
                (D, 3 * D),
                qkv,
                lambda a: tuple(a.reshape(D, 3, N, H)[:, j] for j in range(3)),
                lambda *ws: np.stack(ws, axis=1).reshape(D, 3 * D),
            ),
            _Entry(
                hf + "attn.c_attn.bias",
                (3 * D,),
                qkv_b,
                lambda a: tuple(a.reshape(3, N, H)),
                lambda *bs: np.stack(bs).reshape(3 * D),
            ),
            _direct(hf + "attn.c_proj.weight", (me, "attn", "o_kernel"), (N, H, D), (D, D)),
            _direct(hf + "attn.c_proj.bias", (me, "attn", "o_bias"), (D,)),
            _direct(hf + "mlp.c_fc.weight", (me, "mlp", "up_kernel"), (D, F)),
            _direct(hf + "mlp.c_fc.bias", (me, "mlp", "up_bias"), (F,)),
            _direct(hf + "mlp.c_proj.weight", (me, "mlp", "down_kernel"), (F, D)),
            _direct(hf + "mlp.c_proj.bias", (me, "mlp", "down_bias"), (D,)),
        ]
    return out


def _neox_entries(cfg: ModelConfig) -> list[_Entry]:
    D, N, H, F, V = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    out = [
        _direct("gpt_neox.embed_in.weight", ("embedding",), (V, D)),
        *_layer_norm("gpt_neox.final_layer_norm", ("final_norm",), D),
    ]
    if not cfg.tie_embeddings:
        out.append(_linear("embed_out.weight", ("lm_head",), (D, V)))
    for i in range(cfg.num_layers):
        hf, me = f"gpt_neox.layers.{i}.", f"layers_{i}"
        # Fused Linear output is laid out per head as [N, 3, H] (q, k, v interleaved per head).
        out += [
            *_layer_norm(hf + "input_layernorm", (me, "attn_norm"), D),
            *_layer_norm(hf + "post_attention_layernorm", (me, "mlp_norm"), D),
            _Entry(
                hf + "attention.query_key_value.weight",
                (3 * D, D),
                tuple((me, "attn", f"{n}_kernel") for n in "qkv"),
                lambda a: tuple(a.T.reshape(D, N, 3, H)[:, :, j] for j in range(3)),
                lambda *ws: np.stack(ws, axis=2).reshape(D, 3 * D).T,
            ),
            _linear(hf + "attention.dense.weight", (me, "attn", "o_kernel"), (N, H, D), 2),
            _linear(hf + "mlp.dense_h_to_4h.weight", (me, "mlp", "up_kernel"), (D, F)),
            _direct(hf + "mlp.dense_h_to_4h.bias", (me, "mlp", "up_bias"), (F,)),
            _linear(hf + "mlp.dense_4h_to_h.weight", (me, "mlp", "down_kernel"), (F, D)),
            _direct(hf + "mlp.dense_4h_to_h.bias", (me, "mlp", "down_bias"), (D,)),
        ]
        if cfg.qkv_bias:
            out.append(
                _Entry(
                    hf + "attention.query_key_value.bias",
                    (3 * D,),
                    tuple((me, "attn", f"{n}_bias") for n in "qkv"),
                    lambda a: tuple(a.reshape(N, 3, H)[:, j] for j in range(3)),
                    lambda *bs: np.stack(bs, axis=1).reshape(3 * D),
                )
            )
        if cfg.out_bias:
            out.append(_direct(hf + "attention.dense.bias", (me, "attn", "o_bias"), (D,)))
    return out


def weight_entries(cfg: ModelConfig, gpt2_prefix: str = "transformer.") -> list[_Entry]:
    if cfg.family == "gpt2":
        return _gpt2_entries(cfg, gpt2_prefix)
    if cfg.family == "gpt_neox":
        return _neox_entries(cfg)
    return _llama_entries(cfg)


def _allowed_roots(path: str) -> list[str]:
    """Directories that a checkpoint's tensor files may (really) live in.

    The model directory itself; and, for a snapshot of the Hugging Face hub cache
    (`models--org--name/snapshots/<rev>/`), whose files are symlinks into the repo's
    `blobs/`, that blobs directory.
    """
    real = os.path.realpath(path)
    roots = [real]
    if os.path.basename(os.path.dirname(os.path.abspath(path))) == "snapshots":
        roots.append(os.path.realpath(os.path.join(path, os.pardir, os.pardir, "blobs")))
    return roots


def _confined(path: str, file: str, roots: list[str], source: str) -> str:
    """`path/file`, refused unless it names a file inside the model directory.

    A shard index is data from wherever the checkpoint came from: an entry such as
    "../other/model.safetensors", an absolute path or a symlink out of the directory
    would load weights (and read files) the user never pointed at.
    """
    if os.path.isabs(file) or os.pardir in file.replace("\\", "/").split("/"):
        raise HFCheckpointError(
            f"{source}: tensor file {file!r} is outside the model directory {path}; only "
            "plain file names inside it are accepted"
        )
    full = os.path.join(path, file)
    real = os.path.realpath(full)
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise HFCheckpointError(
            f"{source}: tensor file {file!r} resolves to {real}, outside the model directory "
            f"{path} (a symlink out of it)"
        )
    return full


def _open(file: str):
    """safe_open, with a corrupt or truncated file reported by name."""
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"{file}: not a readable safetensors file: {e}") from e


def _tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    roots = _allowed_roots(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: str(file) for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFCheckpointError(f"{index}: not a shard index with a weight_map: {e!r}") from e
        confined = {file: _confined(path, file, roots, index) for file in set(files.values())}
        return {name: confined[file] for name, file in files.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise HFCheckpointError(
            f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not supported)"
        )
    names = {}
    for file in files:
        full = _confined(path, file, roots, path)
        with _open(full) as f:
            names.update({name: full for name in f.keys()})
    return names


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _read_config(path: str) -> tuple[dict[str, Any], str]:
    """(parsed config.json, its path) of a checkpoint directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise HFCheckpointError(f"{path}: no config.json")
    with open(config_path) as f:
        return json.load(f), config_path


def _gpt2_prefix(cfg: ModelConfig, files: dict[str, str]) -> str:
    """GPT-2 tensors are named `transformer.*` in GPT2LMHeadModel / *ForSequenceClassification
    checkpoints and without the prefix in bare GPT2Model ones."""
    bare = cfg.family == "gpt2" and "transformer.wte.weight" not in files
    return "" if bare else "transformer."


def _load_entries(
    path: str, files: dict[str, str], entries: list[_Entry], cfg: ModelConfig, may_skip=()
) -> dict[str, Any]:
    """Reads every entry's tensor into a nested dict of host float32 arrays (loop layout).

    Raises `HFCheckpointError` for missing or mis-shaped tensors, and for tensors that no
    entry uses unless they are known buffers (`_IGNORED`) or named in `may_skip`.
    """
    missing = [e.hf_name for e in entries if e.hf_name not in files]
    if missing:
        raise HFCheckpointError(
            f"{path}: missing tensor(s) {missing[:10]} for model_type {cfg.family!r} "
            f"({len(files)} tensors found)"
        )
    used = {e.hf_name for e in entries}
    leftover = sorted(
        n for n in files if n not in used and not _IGNORED.search(n) and n not in may_skip
    )
    if leftover:
        raise HFCheckpointError(
            f"{path}: tensor(s) {leftover[:10]} are not used by our {cfg.family!r} model; "
            "loading would silently drop weights"
        )
    params: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    try:
        for e in entries:
            file = files[e.hf_name]
            if file not in handles:
                handles[file] = _open(file).__enter__()
            try:
                shape = tuple(handles[file].get_slice(e.hf_name).get_shape())
                if shape != e.hf_shape:
                    raise HFCheckpointError(
                        f"{file}: tensor {e.hf_name!r} has shape {shape}, expected "
                        f"{e.hf_shape} from config.json"
                    )
                array = handles[file].get_tensor(e.hf_name).astype(np.float32)
            except SafetensorError as err:  # a shard index naming a tensor its file lacks, ...
                raise HFCheckpointError(f"{file}: cannot read tensor {e.hf_name!r}: {err}") from err
            for p, value in zip(e.paths, e.split(array), strict=True):
                _set(params, p, np.ascontiguousarray(value))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    if cfg.scan_layers:
        params = stack_layers(params, cfg.num_layers)
    return params


def from_hf(path: str, dtype: str = "float32", **overrides) -> tuple[DecoderLM, dict[str, Any]]:
    """Load a local Hugging Face checkpoint directory.

    Returns `(model, params)`: `params` is a nested dict of host numpy float32 arrays (put
    them on devices with your own shardings). `dtype` is the compute dtype; `overrides`
    replace other `ModelConfig` fields (e.g. remat=True; scan_layers=True stacks the
    layers' params, see `decoder.stack_layers`). Raises `HFCheckpointError`
    (a ValueError) for unsupported configs and missing, mis-shaped or unused tensors.
    """
    hf_config, config_path = _read_config(path)
    cfg = config_from_hf(hf_config, where=config_path, dtype=dtype, **overrides)
    files = _tensor_files(path)
    entries = weight_entries(cfg, gpt2_prefix=_gpt2_prefix(cfg, files))
    redundant_head = ("lm_head.weight",) if cfg.tie_embeddings else ()
    return DecoderLM(cfg), _load_entries(path, files, entries, cfg, redundant_head)


def to_hf(model: DecoderLM, params, path: str) -> None:
    """Write config.json + model.safetensors (float32) that transformers loads.

    params: the pytree of `model` (boxed or plain, jax or numpy arrays). Each array is
    copied to host with np.asarray, so params sharded across several hosts must be gathered
    first (e.g. jax.experimental.multihost_utils.process_allgather) and written by one host.
    """
    cfg = model.config
    check_exportable(cfg)
    params = nn.unbox(params)
    if cfg.scan_layers:
        params = unstack_layers(params)
    tensors = {}
    for e in weight_entries(cfg):
        values = [np.asarray(_get(params, p), dtype=np.float32) for p in e.paths]
        tensors[e.hf_name] = np.ascontiguousarray(e.join(*values))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _score_entry(cfg: ModelConfig) -> _Entry:
    """The reward head: HF `score.weight` [1, D] <-> our `score` [D, 1]."""
    return _linear("score.weight", ("score",), (cfg.hidden_size, 1))


def to_hf_classifier(model, params, path: str, *, pad_token_id: int) -> None:
    """Write a `models.reward.RewardModel` as the family's `*ForSequenceClassification`
    (config.json with num_labels=1 + model.safetensors, float32) that
    `transformers.AutoModelForSequenceClassification` loads.

    The trunk's tensors are named as in `to_hf` (no `lm_head`); the head is `score.weight`
    [1, D], the name and bias-free shape of every family's classifier in transformers 5.
    pad_token_id: the id the tokenizer pads with; transformers scores each row's rightmost
    token that is not this id (our model: the rightmost real token by segment id).
    """
    cfg = model.config
    check_exportable(cfg)
    params = nn.unbox(params)
    if cfg.scan_layers:
        params = unstack_layers(params)
    entries = [*weight_entries(cfg), _score_entry(cfg)]
    tensors = {}
    for e in entries:
        values = [np.asarray(_get(params, p), dtype=np.float32) for p in e.paths]
        tensors[e.hf_name] = np.ascontiguousarray(e.join(*values))
    hf_config = config_to_hf(cfg)
    family = hf_config["architectures"][0].removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    hf_config["architectures"] = [family + "ForSequenceClassification"]
    hf_config.update(num_labels=1, pad_token_id=int(pad_token_id))
    hf_config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def from_hf_classifier(path: str, dtype: str = "float32", **overrides):
    """Load a `*ForSequenceClassification` directory with one label (a reward model, e.g.
    `to_hf_classifier`'s) as `(models.reward.RewardModel, params)`; the inverse of
    `to_hf_classifier`.

    params: the trunk's (no `lm_head`) plus `score: [D, 1]`, host numpy float32. Our model
    scores each row's rightmost real token by segment id; transformers' the rightmost token
    that is not config.json's `pad_token_id`: the same token when the tokenizer pads with
    that id. dtype / overrides as in `from_hf`. Raises `HFCheckpointError` for a checkpoint
    that is not a one-label classifier, and as `from_hf` for its tensors.
    """
    hf_config, config_path = _read_config(path)
    architectures = hf_config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise HFCheckpointError(
            f"{config_path}: architectures {architectures} has no *ForSequenceClassification "
            "(a causal LM loads with from_hf)"
        )
    num_labels = hf_config.get("num_labels", len(hf_config.get("id2label") or {"0": None}))
    if num_labels != 1:
        raise HFCheckpointError(
            f"{config_path}: num_labels={num_labels}; a reward model has one label (a scalar)"
        )
    cfg = trunk_config(config_from_hf(hf_config, where=config_path, dtype=dtype, **overrides))
    files = _tensor_files(path)
    entries = [*weight_entries(cfg, gpt2_prefix=_gpt2_prefix(cfg, files)), _score_entry(cfg)]
    return RewardModel(cfg), _load_entries(path, files, entries, cfg)
