"""`validate(config)`: every key is checked before any data is read or model built, and
each problem names its dotted key."""

from __future__ import annotations

import pytest
from test_loop import load_config

from dpo_jax.train import loop
from dpo_jax.train.validate import ConfigError, objective_of, validate


def _tiny(name="dpo", **overrides):
    config = load_config(name)
    with config.unlocked():
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def _problems(config) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config)
    return str(info.value)


def test_negative_steps_and_other_problems_are_reported_together():
    message = _problems(_tiny(**{"dpo.steps": -5, "dpo.accum_steps": 3, "log.every_steps": 0}))
    assert "config.dpo.steps=-5" in message
    assert "config.dpo.accum_steps=3 must divide config.dpo.batch_size=8" in message
    assert "config.log.every_steps=0" in message


def test_loss_hyperparameters_are_set_by_dotted_key_and_checked_against_the_loss():
    # The command line can set one (a locked config accepts the key: it exists, unset).
    config = load_config("dpo")
    config.dpo.loss.hparams.label_smoothing = 0.1
    validate(config)
    assert dict(objective_of(config).hparams) == {"label_smoothing": 0.1}
    config.dpo.loss.name = "hinge"  # takes no label smoothing
    message = _problems(config)
    assert "config.dpo.loss.hparams.label_smoothing=0.1: loss 'hinge' has no such" in message
    with pytest.raises(AttributeError):
        config.dpo.loss.hparams.label_smothing = 0.1  # a typo is no key at all


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dpo.loss.name": "sigmiod"}, "config.dpo.loss.name: unknown loss"),
        ({"dpo.loss.beta": 0.0}, "config.dpo.loss.beta=0.0: must be > 0"),
        ({"dpo.reference": "none"}, "config.dpo.reference='none': loss 'sigmoid' needs"),
        ({"dpo.reference": "frozen"}, "config.dpo.reference='frozen'"),
        ({"dpo.init_from": "sft"}, "needs 'sft' in config.stages"),
        ({"data.layout": "packed", "parallel.mode": "pmap"}, "needs config.parallel.mode='jit'"),
        ({"data.on_bad_record": "ignore"}, "config.data.on_bad_record"),
        ({"data.tokenize_mode": "trl"}, "config.data.tokenize_mode"),
        ({"dpo.optimizer.name": "lamb"}, "config.dpo.optimizer"),
        ({"parallel.mesh_shape": (3, 1, 1)}, "config.parallel.mesh_shape"),
        ({"dpo.batch_size": 4, "parallel.mesh_shape": (8, 1, 1)}, "must divide into its 8"),
        ({"model.preset": "gpt5"}, "config.model.preset='gpt5'"),
        ({"model.hf_path": "/nonexistent"}, "config.model.hf_path='/nonexistent'"),
        ({"stages": ("dpo", "sft")}, "SFT runs before DPO"),
        ({"guard.max_update_ratio": -1.0}, "config.guard.max_update_ratio"),
        ({"dpo.logps_chunk_size": 0}, "config.dpo.logps_*"),
    ],
)
def test_each_bad_key_is_named(overrides, expected):
    assert expected in _problems(_tiny(**overrides))


def test_the_run_refuses_a_bad_config_before_reading_data(tmp_path):
    config = _tiny(**{"dpo.steps": -5, "data.synthetic": False,
                      "data.train_files": ("/nonexistent/train.jsonl",),
                      "data.tokenizer": str(tmp_path)})  # fmt: skip
    with pytest.raises(ConfigError, match=r"config.dpo.steps=-5"):
        loop.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "data").exists()
