"""Preferred-FT (the DPO paper's baseline: SFT on the chosen responses of the preference
pairs) is the SFT stage alone, started from another run's exported Hugging Face directory
(`model.hf_path`) and fed a pair file: it must start from exactly those weights and train on
the chosen responses only."""

from __future__ import annotations

import os

import jax
import numpy as np
from test_loop import load_config

from dpo_jax import main as main_lib
from dpo_jax import models, parallel
from dpo_jax.data import synthetic
from dpo_jax.train import loop


def _export_a_previous_run(path: str) -> str:
    """What a finished run leaves in <workdir>/hf: weights (models.to_hf) and tokenizer."""
    tokenizer = synthetic.build_char_tokenizer(path)
    model = models.DecoderLM(models.ModelConfig.tiny(vocab_size=len(tokenizer)))
    params = model.init(jax.random.key(7), np.zeros((1, 4), np.int32))["params"]
    models.to_hf(model, jax.device_get(parallel.unbox(params)), path)
    return path


def _first_step(config, workdir, monkeypatch) -> dict:
    """Runs `config`; returns the params and batch of the first call of the compiled step
    (copied to the host before the call donates the state)."""
    seen = {}
    jit_step = parallel.jit_step

    def spy(*args, **kwargs):
        step = jit_step(*args, **kwargs)

        def first(state, batch, reference):
            if not seen:
                seen.update(params=jax.device_get(state.params), batch=jax.device_get(batch))
            return step(state, batch, reference)

        return first

    monkeypatch.setattr(parallel, "jit_step", spy)
    loop.run(config, workdir)
    return seen


def test_sft_stage_from_an_exported_hf_dir_trains_on_the_chosen_side(tmp_path, monkeypatch):
    hf = _export_a_previous_run(str(tmp_path / "previous" / "hf"))
    records = synthetic.make_preference_records(24, seed=5)
    pairs = synthetic.write_jsonl(records, tmp_path / "pairs.jsonl")
    config = main_lib.apply_overrides(
        load_config("sft"),
        {
            "model.hf_path": hf,
            "data.synthetic": False,
            "data.train_files": (pairs,),
            "sft.steps": 1,
        },
    )
    seen = _first_step(config, str(tmp_path / "preferred_ft"), monkeypatch)

    # It starts from the exported weights, not from a seeded random init.
    _, exported = models.from_hf(hf)
    jax.tree.map(np.testing.assert_array_equal, seen["params"], jax.device_get(exported))

    # Its scored tokens are chosen responses (with EOS), never rejected ones.
    tokenizer = synthetic.build_char_tokenizer(str(tmp_path / "tok"))
    batch = {k: np.asarray(v) for k, v in seen["batch"].items()}
    real = batch.get("example_mask", np.ones(len(batch["tokens"]))) != 0
    chosen = {r["chosen"] for r in records}
    rejected = {r["rejected"] for r in records} - chosen
    targets = [
        tokenizer.decode(row[mask != 0], skip_special_tokens=True)
        for row, mask in zip(batch["tokens"][real], batch["loss_mask"][real], strict=True)
    ]
    assert len(targets) == config.sft.batch_size
    assert set(targets) <= chosen and not set(targets) & rejected
    assert all(
        row[mask != 0][-1] == tokenizer.eos_token_id
        for row, mask in zip(batch["tokens"][real], batch["loss_mask"][real], strict=True)
    )
    assert os.path.exists(os.path.join(tmp_path, "preferred_ft", "metrics.jsonl"))
