"""A workdir is a contract: run identity, refused reruns, incompatible checkpoints, and the
content fingerprints that key caches (dpo_jax/train/workdir.py, checkpoints.py)."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_loop import load_config

from dpo_jax.data import synthetic
from dpo_jax.data.examples import TokenizedPair
from dpo_jax.train import loop
from dpo_jax.train import workdir as workdir_lib
from dpo_jax.train.checkpoints import (
    IncompatibleCheckpointError,
    StageCheckpointer,
    abstract_like,
)
from dpo_jax.train.workdir import WorkdirError, claim, run_identity


def _file_config(tmp_path):
    """The tiny DPO config reading its data from files (train, eval, tokenizer)."""
    data = tmp_path / "inputs"
    synthetic.write_jsonl(synthetic.make_preference_records(24, 0), data / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_preference_records(8, 1), data / "eval.jsonl")
    synthetic.build_char_tokenizer(data / "tokenizer")
    config = load_config("dpo")
    with config.unlocked():
        config.data.synthetic = False
        config.data.train_files = (str(data / "train.jsonl"),)
        config.data.eval_files = (str(data / "eval.jsonl"),)
        config.data.tokenizer = str(data / "tokenizer")
    return config, data


def _changed(config, **dotted):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in dotted.items():
            *parents, leaf = key.split("__")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
    return config


def _digests(directory) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------
# Identity and claim
# ------------------------------------------------------------------------------------------


def test_same_config_same_identity_and_rerun_is_accepted(tmp_path):
    config, _ = _file_config(tmp_path)
    identity = run_identity(config)
    assert identity == run_identity(_changed(config))
    assert identity["dpo.loss.beta"] == 0.1 and "log.every_steps" not in identity
    assert {"identity.tokenizer", "identity.data.train_files", "identity.data.eval_files"} <= (
        identity.keys()
    )
    workdir = str(tmp_path / "run")
    claim(workdir, config)
    run_json = os.path.join(workdir, "run.json")
    record = json.load(open(run_json))
    assert record["identity"] == json.loads(json.dumps(identity))
    assert json.load(open(os.path.join(workdir, "config.json")))["dpo"]["loss"]["name"] == "sigmoid"
    claim(workdir, config)  # the same run again: accepted, nothing recorded as changed
    assert json.load(open(run_json))["changes"] == []


def test_changed_loss_beta_and_data_content_are_refused_listing_each_key(tmp_path):
    config, data = _file_config(tmp_path)
    workdir = str(tmp_path / "run")
    claim(workdir, config)
    before = _digests(workdir)
    synthetic.write_jsonl(synthetic.make_preference_records(24, 7), data / "train.jsonl")
    changed = _changed(config, dpo__loss__name="ipo", dpo__loss__beta=0.5)
    with pytest.raises(WorkdirError) as refused:
        claim(workdir, changed)
    message = str(refused.value)
    assert "3 setting(s)" in message
    assert 'config.dpo.loss.name: "sigmoid" -> "ipo"' in message
    assert "config.dpo.loss.beta: 0.1 -> 0.5" in message
    assert "identity.data.train_files (content of config.data.train_files)" in message
    assert "--workdir" in message and "--allow_config_change" in message
    assert _digests(workdir) == before  # a refusal writes nothing

    # The explicit escape hatch: continue, recorded; then the new settings are the run's.
    claim(workdir, changed, allow_config_change=True)
    record = json.load(open(os.path.join(workdir, "run.json")))
    assert record["changes"][-1]["allowed"] is True
    assert record["changes"][-1]["keys"]["dpo.loss.beta"] == [0.1, 0.5]
    claim(workdir, changed)
    with pytest.raises(WorkdirError, match="config.dpo.loss.beta: 0.5 -> 0.1"):
        claim(workdir, _changed(changed, dpo__loss__name="sigmoid", dpo__loss__beta=0.1))


def test_operational_changes_resume_and_are_recorded(tmp_path, caplog):
    config, data = _file_config(tmp_path)
    workdir = str(tmp_path / "run")
    claim(workdir, config)
    # The same data at another path, other logging/checkpoint/eval/parallel settings.
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes((data / "train.jsonl").read_bytes())
    changed = _changed(
        config,
        data__train_files=(str(moved),),
        log__every_steps=7,
        checkpoint__keep=5,
        eval__every_steps=11,
        parallel__mode="pmap",
    )
    assert run_identity(changed) == run_identity(config)
    with caplog.at_level("WARNING"):
        claim(workdir, changed)
    assert "operational settings changed" in caplog.text and "config.log.every_steps" in caplog.text
    record = json.load(open(os.path.join(workdir, "run.json")))
    assert record["changes"][-1]["allowed"] is False
    assert set(record["changes"][-1]["keys"]) == {
        "data.train_files", "log.every_steps", "checkpoint.keep", "eval.every_steps",
        "parallel.mode",
    }  # fmt: skip
    written = json.load(open(os.path.join(workdir, "config.json")))
    assert written["log"]["every_steps"] == 7 and written["parallel"]["mode"] == "pmap"


def test_workdir_without_run_identity_is_adopted_only_when_asked(tmp_path):
    config = load_config("dpo")
    workdir = tmp_path / "legacy"
    (workdir / "checkpoints" / "dpo" / "4").mkdir(parents=True)
    with pytest.raises(WorkdirError, match="no run.json.*--allow_config_change"):
        claim(str(workdir), config)
    assert not (workdir / "run.json").exists()
    claim(str(workdir), config, allow_config_change=True)
    assert json.load(open(workdir / "run.json"))["changes"][0]["adopted"] is True
    claim(str(workdir), config)


def test_model_and_tokenizer_identity_follow_their_content(tmp_path):
    config, data = _file_config(tmp_path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    weights = {"w": np.arange(4096, dtype=np.float32)}
    save_file(weights, str(model_dir / "model.safetensors"))
    config = _changed(config, model__hf_path=str(model_dir), model__preset="")
    first = run_identity(config)
    # A fine-tune of the same architecture: same names, shapes, sizes; other values.
    save_file({"w": weights["w"] + 1.0}, str(model_dir / "model.safetensors"))
    second = run_identity(config)
    assert first["identity.model"] != second["identity.model"]
    assert first["identity.tokenizer"] == second["identity.tokenizer"]
    (data / "tokenizer" / "README.md").write_text("notes that do not change tokenization")
    assert run_identity(config)["identity.tokenizer"] == second["identity.tokenizer"]
    vocab = data / "tokenizer" / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"a"', '"z"', 1))
    assert run_identity(config)["identity.tokenizer"] != second["identity.tokenizer"]
    with pytest.raises(FileNotFoundError, match="config.model.hf_path"):
        run_identity(_changed(config, model__hf_path=str(tmp_path / "missing")))


def test_tfds_identity_follows_the_manual_files_then_the_prepared_files(tmp_path):
    from test_data_tfds import _hh_record, _write_jsonl_gz

    from dpo_jax.data import tfds_builders

    manual = tmp_path / "hh"

    def write_split(split, n, extra=""):
        records = [_hh_record("helpful-base", split, i) for i in range(n)]
        records[-1]["chosen"] += extra
        _write_jsonl_gz(manual / "helpful-base" / f"{split}.jsonl.gz", records)

    write_split("train", 6)
    write_split("test", 3)
    config = _changed(load_config("dpo"), data__synthetic=False,
                      data__tfds_name="hh_rlhf/helpful_base",
                      data__tfds_data_dir=str(tmp_path / "tfds"),
                      data__tfds_manual_dir=str(manual))  # fmt: skip
    first = run_identity(config)
    assert first["identity.data.tfds_version"] == "1.0.0"
    write_split("test", 3, extra=" (edited)")
    assert (
        run_identity(config)["identity.data.tfds_manual_files"]
        != (first["identity.data.tfds_manual_files"])
    )
    prepared_only = _changed(config, data__tfds_manual_dir="")
    with pytest.raises(FileNotFoundError, match="tfds_manual_dir"):
        run_identity(prepared_only)  # nothing prepared yet, nothing to prepare it from
    tfds_builders.prepare("hh_rlhf/helpful_base", manual_dir=manual, data_dir=tmp_path / "tfds")
    files = run_identity(prepared_only)["identity.data.tfds_files"]
    assert sorted(files) == ["hh_rlhf-test.array_record-00000-of-00001",
                             "hh_rlhf-train.array_record-00000-of-00001"]  # fmt: skip
    assert all(len(digest) == 64 for digest in files.values())


# ------------------------------------------------------------------------------------------
# Checkpoints that do not belong to the run
# ------------------------------------------------------------------------------------------


def test_checkpoint_that_does_not_fit_is_incompatible_not_unreadable(tmp_path):
    directory = str(tmp_path / "ckpt")
    checkpointer = StageCheckpointer(directory, keep=3, async_save=False)
    for step in (2, 4):
        checkpointer.save(step, {"params": {"w": jnp.ones((4, 3)) * step}}, {"position": step})
    checkpointer.close()
    before = _digests(directory)
    for target, shown in (
        ({"params": {"w": jnp.ones((4, 5))}}, "shape (4, 3) float32 in the checkpoint but "
                                              "shape (4, 5) float32 in this run"),
        ({"params": {"w": jnp.ones((4, 3), jnp.bfloat16)}}, "(4, 3) bfloat16 in this run"),
        ({"params": {"v": jnp.ones((4, 3))}}, "params.v is absent in the checkpoint"),
    ):  # fmt: skip
        checkpointer = StageCheckpointer(directory, keep=3, async_save=False)
        with pytest.raises(IncompatibleCheckpointError, match="step 4") as err:
            checkpointer.restore_latest(abstract_like(target))
        assert shown in str(err.value)
        checkpointer.close()
    assert _digests(directory) == before  # nothing set aside, moved or deleted


def test_directory_of_unreadable_steps_never_restarts_from_scratch(tmp_path):
    directory = tmp_path / "ckpt"
    checkpointer = StageCheckpointer(str(directory), keep=3, async_save=False)
    tree = {"w": jnp.arange(4.0)}
    for step in (2, 4):
        checkpointer.save(step, tree, {"position": step})
    checkpointer.close()
    for path in glob.glob(str(directory / "*" / "state" / "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"corrupted")
    before = _digests(directory)
    checkpointer = StageCheckpointer(str(directory), keep=3, async_save=False)
    with pytest.raises(WorkdirError, match="every checkpoint .* is unreadable"):
        checkpointer.restore_latest(abstract_like(tree))
    # A save below the steps on disk (a fresh start next to them) is refused too, so
    # keep-N cleanup can never delete them.
    with pytest.raises(WorkdirError, match="refusing to save step 2"):
        checkpointer.save(2, tree, {"position": 0})
    checkpointer.close()
    assert _digests(directory) == before


def test_rerun_with_another_model_size_refuses_and_leaves_checkpoints_identical(tmp_path):
    """Issue 15 case 2: a finished run, rerun with a smaller model. The claim refuses it;
    forced past the claim, the checkpoint check stops it; the files never change."""
    config = _changed(load_config("dpo"), dpo__steps=2)
    workdir = str(tmp_path / "run")
    loop.run(config, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    before = _digests(checkpoints)
    metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
    smaller = _changed(config)
    with smaller.unlocked():
        smaller.model.overrides.hidden_size = 32
    with pytest.raises(WorkdirError, match="config.model.overrides.hidden_size: <absent> -> 32"):
        loop.run(smaller, workdir)  # refused by the claim, before anything is written
    assert _digests(checkpoints) == before
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
    with pytest.raises(IncompatibleCheckpointError, match=r"step 2 .*\(100, 64\).*\(100, 32\)"):
        loop.run(smaller, workdir, allow_config_change=True)
    assert _digests(checkpoints) == before


# ------------------------------------------------------------------------------------------
# Content fingerprints
# ------------------------------------------------------------------------------------------


def test_params_fingerprint_follows_content_not_layout():
    params = {
        "dense": {"kernel": jnp.arange(64.0).reshape(8, 8), "bias": jnp.zeros((8,))},
        "embedding": jnp.ones((16, 8), jnp.bfloat16),
        "step": jnp.array(3, jnp.int32),
    }
    fingerprint = workdir_lib.params_fingerprint(params)
    assert workdir_lib.params_fingerprint(jax.device_get(params)) == fingerprint
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))

    def shard(x):  # over the 8 fake devices along the first axis where it divides
        split = x.ndim and x.shape[0] % len(jax.devices()) == 0
        spec = jax.sharding.PartitionSpec("data") if split else jax.sharding.PartitionSpec()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    sharded = jax.tree.map(shard, params)
    assert sharded["dense"]["kernel"].sharding.shard_shape((8, 8)) == (1, 8)
    assert workdir_lib.params_fingerprint(sharded) == fingerprint
    variants = [
        # The smallest change of one value (one ulp).
        {**params, "dense": {**params["dense"],
                             "kernel": params["dense"]["kernel"].at[3, 5].set(
                                 jnp.nextafter(29.0, 30.0))}},
        # Two values swapped: the same sum, another position.
        {**params, "dense": {**params["dense"], "kernel": params["dense"]["kernel"].at[
            jnp.array([0, 0]), jnp.array([1, 2])].set(jnp.array([2.0, 1.0]))}},
        {**params, "embedding": params["embedding"].astype(jnp.float32)},  # same values
        {**params, "step": jnp.array(4, jnp.int32)},
        {**params, "dense": {"kernel": params["dense"]["kernel"].reshape(4, 16),
                             "bias": params["dense"]["bias"]}},
    ]  # fmt: skip
    fingerprints = {workdir_lib.params_fingerprint(v) for v in variants}
    assert fingerprint not in fingerprints and len(fingerprints) == len(variants)


def test_pairs_fingerprint_follows_token_ids_boundaries_and_options():
    pairs = [TokenizedPair([1, 2, 3], [4, 5, 2], [6, 2]), TokenizedPair([7], [8, 2], [9, 2])]
    options = {"max_length": 32, "memory_efficient": False}
    fingerprint = workdir_lib.pairs_fingerprint(pairs, options)
    assert fingerprint == workdir_lib.pairs_fingerprint(list(pairs), dict(options))
    variants = [
        workdir_lib.pairs_fingerprint([pairs[0], TokenizedPair([7], [8, 2], [10, 2])], options),
        # The same tokens, one moved from the prompt into the chosen response.
        workdir_lib.pairs_fingerprint(
            [TokenizedPair([1, 2], [3, 4, 5, 2], [6, 2]), pairs[1]], options
        ),
        workdir_lib.pairs_fingerprint(pairs[::-1], options),
        workdir_lib.pairs_fingerprint(pairs[:1], options),
        workdir_lib.pairs_fingerprint(pairs, {**options, "memory_efficient": True}),
    ]
    assert fingerprint not in variants and len(set(variants)) == len(variants)
