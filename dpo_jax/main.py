"""Command line: `python -m dpo_jax.main --config=configs/NAME.py:ARG --workdir=DIR`.

Any config field can be overridden: `--config.dpo.loss.beta=0.5`. Rerunning the same
command resumes from the workdir's checkpoints; a rerun whose settings would change the
result is refused (dpo_jax/train/workdir.py says what counts) unless
`--allow_config_change`. `--sweep_index=i` runs member i of the config's `sweep` list in
`<workdir>/sweep_<i>` (-1 runs every member in turn).

Errors and console: see `dpo_jax.cli` (one message per configuration or data error,
`--debug` for the traceback, a prompt non-zero exit, warnings and our own lines only).
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import app, flags
from ml_collections import config_flags

from dpo_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (NAME.py:ARG).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
_SWEEP_INDEX = flags.DEFINE_integer(
    "sweep_index", None, "Run one member of config.sweep (-1: all members, one after another)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue a workdir's run although settings that determine the result changed (or adopt "
    "a workdir written before run identities were recorded). The change is recorded in "
    "<workdir>/run.json.",
)
# Named for the package, not "__main__", so that the console filter lets its lines through.
log = std_logging.getLogger("dpo_jax.main")


def apply_overrides(config, overrides: dict):
    """A copy of `config` with {dotted.field: value} overrides applied (for sweeps)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = config
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(f"sweep override {dotted!r}: no such config field")
            node[leaf] = value
    return config


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------


def _train():
    # Imported here so that `--help` and flag errors do not pay for importing jax.
    from dpo_jax.train import loop

    config, workdir = _CONFIG.value, _WORKDIR.value
    if workdir is None:
        raise app.UsageError("--workdir is required")
    allow = _ALLOW_CONFIG_CHANGE.value
    sweep = list(config.get("sweep", ()))
    if _SWEEP_INDEX.value is None:
        loop.run(config, workdir, allow_config_change=allow)
        return
    if not sweep:
        raise app.UsageError("--sweep_index given but the config defines no sweep")
    indices = range(len(sweep)) if _SWEEP_INDEX.value == -1 else [_SWEEP_INDEX.value]
    for i in indices:
        if not 0 <= i < len(sweep):
            raise app.UsageError(f"--sweep_index={i}: the sweep has {len(sweep)} members")
        log.info("Sweep member %d: %s", i, dict(sweep[i]))
        member_dir = os.path.join(workdir, f"sweep_{i}")
        loop.run(apply_overrides(config, dict(sweep[i])), member_dir, allow_config_change=allow)


def main(argv):
    del argv
    cli.guarded(_train)


def run():
    """Console-script entry point (`dpo-jax --config=... --workdir=...`)."""
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
