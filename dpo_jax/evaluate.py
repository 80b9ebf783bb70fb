"""Command line: `python -m dpo_jax.evaluate --config=configs/evaluate.py:ARG --workdir=DIR`.

Evaluates the training run in DIR (or `--config.policy_hf_path`): samples completions of
held-out prompts, scores them, estimates KL to the reference, and writes DIR/eval/
(samples_<checkpoint>.jsonl, metrics.csv) and a printed table. See
`dpo_jax.evaluation.run` for what is evaluated against what. Errors and console as for
training (`dpo_jax.cli`).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from dpo_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (NAME.py:ARG).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir to evaluate, or where an HF policy's eval/ goes."
)


def _evaluate():
    # Imported here so that `--help` and flag errors do not pay for importing jax.
    from dpo_jax.evaluation import run as run_lib

    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    run_lib.run(_CONFIG.value, _WORKDIR.value)


def main(argv):
    del argv
    cli.guarded(_evaluate)


def run():
    """Console-script entry point (e.g. `dpo-jax-evaluate --config=... --workdir=...`)."""
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
