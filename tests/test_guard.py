"""The update guard in a real run: blown-up updates are refused, a run that only skips
steps stops with an error (keeping its last accepted params), a model/tokenizer mismatch
is refused before the first step."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import _restore_params, load_config, read_metrics

from dpo_jax import models, parallel
from dpo_jax.train import loop
from dpo_jax.train.checkpoints import StageCheckpointer


def _config(learning_rate: float, *, limit: int = 3, steps: int = 6):
    config = load_config("dpo")
    with config.unlocked():
        config.dpo.optimizer.learning_rate = learning_rate
        config.dpo.optimizer.warmup_steps = 0
        config.dpo.steps = steps
        config.guard.max_consecutive_skipped = limit
        config.log.every_steps = 2
        config.checkpoint.every_steps = 1
        config.checkpoint.keep = 10
    return config


@pytest.mark.parametrize(
    ("learning_rate", "counter"),
    [(1e37, "nonfinite_steps_total"),  # updates overflow float32
     (1e6, "rejected_steps_total")],  # finite updates, but larger than the params
)  # fmt: skip
def test_a_run_that_only_skips_steps_stops_with_its_last_good_params(
    tmp_path, learning_rate, counter
):
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.TrainingAborted, match=r"the last [34] steps .* were all skipped"):
        loop.run(_config(learning_rate), workdir)
    records = [r for r in read_metrics(workdir) if r["stage"] == "dpo" and "loss" in r]
    assert records[-1][counter] >= 3 and records[-1]["step"] <= 4
    steps = StageCheckpointer(os.path.join(workdir, "checkpoints", "dpo")).all_steps()
    assert steps  # the skipped steps were checkpointed, with the params they kept
    params = _restore_params(os.path.join(workdir, "checkpoints", "dpo", str(steps[-1]), "state"))
    initial = _restore_params(os.path.join(workdir, "checkpoints", "dpo", str(steps[0]), "state"))
    for name, value in params.items():
        assert np.isfinite(value).all(), name
        np.testing.assert_array_equal(value, initial[name], err_msg=name)


def test_a_sane_learning_rate_is_never_refused(tmp_path):
    workdir = str(tmp_path / "run")
    loop.run(_config(1e-3, limit=2), workdir)
    records = [r for r in read_metrics(workdir) if r["stage"] == "dpo" and "loss" in r]
    assert records[-1]["step"] == 6
    assert records[-1]["nonfinite_steps_total"] == records[-1]["rejected_steps_total"] == 0
    assert all(0 < r["update_norm"] for r in records)


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    # The synthetic tokenizer has 100 tokens; a local HF model with 50 would NaN every step.
    model = models.DecoderLM(models.ModelConfig.tiny(vocab_size=50))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    models.to_hf(model, jax.device_get(parallel.unbox(params)), str(tmp_path / "hf"))
    config = load_config("dpo")
    with config.unlocked():
        config.model.preset = ""
        config.model.hf_path = str(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"vocabulary \(50 tokens\) is smaller than the "
                                         r"tokenizer's \(100\)"):  # fmt: skip
        loop.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "dpo")
