"""Reference-free losses hold one model: no frozen reference, no cached sums, whatever
`config.dpo.reference` says, and a compiled train step whose only inputs are the state and
the batch."""

from __future__ import annotations

import os
import re

import jax
import pytest
from test_loop import load_config

from dpo_jax import losses, parallel
from dpo_jax.train import loop
from dpo_jax.train.validate import reference_mode

REFERENCE_FREE = [n for n in losses.names() if not losses.requires_reference(n)]


def test_the_reference_free_losses_are_the_expected_ones():
    assert {"orpo", "simpo", "cpo", "sigmoid_reference_free"} <= set(REFERENCE_FREE)
    assert "sigmoid" not in REFERENCE_FREE


@pytest.mark.parametrize("reference", ["params", "cached", "none"])
@pytest.mark.parametrize("loss", REFERENCE_FREE)
def test_reference_mode_is_none_for_reference_free_losses(loss, reference):
    config = load_config("dpo")
    with config.unlocked():
        config.dpo.loss.name, config.dpo.reference = loss, reference
    assert reference_mode(config) == "none"


@pytest.mark.parametrize("reference", ["params", "cached"])
def test_reference_mode_keeps_the_choice_of_a_reference_loss(reference):
    config = load_config("dpo")
    with config.unlocked():
        config.dpo.reference = reference
    assert reference_mode(config) == reference


def _main_arguments(lowered) -> int:
    """Number of arguments of the lowered program's entry function (flattened leaves)."""
    text = lowered.as_text()
    signature = re.search(r"func\.func public @main\((.*?)\)\s*->", text, re.S).group(1)
    return len(re.findall(r"%arg\d+:", signature))


def _first_step(config, workdir, monkeypatch):
    """Runs `config` and returns (reference, batch, state leaves, lowered step) of the first
    call of the compiled train step (lowered before the call donates the state)."""
    seen = {}
    jit_step = parallel.jit_step

    def spy(*args, **kwargs):
        step = jit_step(*args, **kwargs)

        def first(state, batch, reference):
            if not seen:
                seen.update(
                    reference=reference,
                    batch=dict(batch),
                    state_leaves=len(jax.tree.leaves(state)),
                    lowered=step.lower(state, batch, reference),
                )
            return step(state, batch, reference)

        return first

    monkeypatch.setattr(parallel, "jit_step", spy)
    loop.run(config, workdir)
    return seen


def _short(config, loss, reference):
    with config.unlocked():
        config.dpo.loss.name, config.dpo.reference = loss, reference
        config.dpo.steps = 1
    return config


@pytest.mark.parametrize("loss,reference", [("simpo", "params"), ("orpo", "cached")])
def test_reference_free_step_has_no_reference_arguments(tmp_path, monkeypatch, loss, reference):
    workdir = str(tmp_path / loss)
    seen = _first_step(_short(load_config("dpo"), loss, reference), workdir, monkeypatch)
    assert seen["reference"] is None
    assert "ref_logps" not in seen["batch"]
    inputs = seen["state_leaves"] + len(seen["batch"])
    assert _main_arguments(seen["lowered"]) == inputs
    # No cached sums were scored or written either.
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "dpo", "ref_logps.npy"))


def test_a_reference_loss_step_takes_the_reference_params(tmp_path, monkeypatch):
    """The contrast that makes the test above able to fail: DPO's step has one argument per
    reference leaf on top of the state and the batch."""
    config = _short(load_config("dpo"), "sigmoid", "params")
    seen = _first_step(config, str(tmp_path / "dpo"), monkeypatch)
    reference_leaves = len(jax.tree.leaves(seen["reference"]))
    assert reference_leaves > 0
    inputs = seen["state_leaves"] + len(seen["batch"]) + reference_leaves
    assert _main_arguments(seen["lowered"]) == inputs
