"""The command line as users meet it: `python -m dpo_jax.main` in a subprocess.

Errors end in one message and a non-zero exit code (a traceback only with --debug), a
failed checkpoint write ends the process within seconds instead of hanging on orbax's and
TensorBoard's threads, and unknown config keys are named by their dotted path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=" + os.path.join(ROOT, "configs", "dpo.py") + ":tiny"


def _cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpo_jax.main", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Makes creating orbax's temporary step directories under FAIL_DIR fail as `chattr +i` does
# (as root, chmod would not stop the writes), and notes when the first failure happened.
_FAULT = textwrap.dedent(
    """
    import os, time

    _makedirs = os.makedirs

    def makedirs(name, *args, **kwargs):
        path = os.fspath(name)
        if path.startswith(os.environ["FAIL_DIR"]) and "orbax-checkpoint-tmp" in path:
            with open(os.environ["FAIL_STAMP"], "a") as f:
                f.write(f"{time.time()}\\n")
            raise PermissionError(1, "Operation not permitted", path)
        return _makedirs(name, *args, **kwargs)

    os.makedirs = makedirs
    """
)


def test_failed_checkpoint_write_exits_non_zero_within_seconds(tmp_path):
    """Issue 15 case 1: the checkpoint directory cannot be written. Before, the process
    printed the PermissionError and then hung forever in threading._shutdown."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAULT)
    workdir, stamp = tmp_path / "run", tmp_path / "failed_at"
    env = {
        "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]),
        "FAIL_DIR": str(workdir / "checkpoints" / "dpo"),
        "FAIL_STAMP": str(stamp),
    }
    result = _cli(TINY, f"--workdir={workdir}", env=env, timeout=600)
    ended = time.time()
    assert stamp.exists(), result.stderr[-3000:]  # the fault did fire
    failed = float(stamp.read_text().split()[0])
    assert result.returncode == 1, result.stderr[-3000:]
    assert ended - failed < 10, f"exited {ended - failed:.1f} s after the failure"
    assert "Error: Operation not permitted: " + str(workdir / "checkpoints" / "dpo") in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and "--debug" in result.stderr
    # The console holds no orbax INFO records (absl's default would print hundreds).
    assert not re.search(r"^I\d{4} .*(checkpoint_manager|async_checkpointer)\.py", result.stderr,
                         re.M), result.stderr[-3000:]  # fmt: skip


def test_configuration_error_is_one_message_and_debug_adds_the_traceback(tmp_path):
    from dpo_jax.data import synthetic

    synthetic.build_char_tokenizer(tmp_path / "tokenizer")
    args = [
        TINY,
        f"--workdir={tmp_path / 'run'}",
        "--config.data.synthetic=False",
        "--config.data.train_files=/nonexistent/train.jsonl",
        "--config.data.tokenizer=" + str(tmp_path / "tokenizer"),
    ]
    result = _cli(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "/nonexistent/train.jsonl" in errors[0], result.stderr[-3000:]
    debug = _cli(*args, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "/nonexistent/train.jsonl" in debug.stderr


def test_unknown_config_key_is_reported_by_its_dotted_path(tmp_path):
    workdir = f"--workdir={tmp_path}"
    typo = _cli(TINY, workdir, "--config.dpo.loss.bta=0.5", timeout=120)
    assert typo.returncode == 1 and "Traceback" not in typo.stderr
    assert "unknown config key --config.dpo.loss.bta" in typo.stderr
    assert "did you mean 'beta'?" in typo.stderr
    # An empty group (model.overrides) takes its fields as one dict.
    new_field = _cli(TINY, workdir, "--config.model.overrides.hidden_size=32", timeout=120)
    assert new_field.returncode == 1 and "Traceback" not in new_field.stderr
    assert "config.model.overrides has no field 'hidden_size'" in new_field.stderr
    assert "--config.model.overrides=\"{'hidden_size': VALUE}\"" in new_field.stderr
    assert not os.listdir(tmp_path)  # nothing ran
