"""What every dpo_jax command line shares: one-message errors, a prompt exit, a quiet console.

`guarded(job)` runs a command's job under these rules (`dpo_jax.main`, `dpo_jax.evaluate`):

Errors: a configuration, data, workdir or file-system error prints one message (what,
where, what to change) without a traceback (`--debug` adds it); any other exception prints
its traceback. Either way the exit code is 1 and the process ends promptly: checkpoint and
TensorBoard threads get `SHUTDOWN_TIMEOUT_S` seconds to finish, then the process exits
(a pod job must not hang on a failed save). Command-line errors exit with 1 (absl); an
unknown `--config.a.b` key is named by its dotted path (`parse_flags`).

Console: warnings (other libraries' without their tracebacks), progress bars and dpo_jax's
own progress and summary lines; absl's `--verbosity=0` brings back every library's INFO
records (orbax writes hundreds) and tracebacks.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as std_logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import ConfigDict

_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of every error.")

SHUTDOWN_TIMEOUT_S = 5.0
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def guarded(job: Callable[[], None]) -> None:
    """Runs `job()` with the console and error rules of the module docstring."""
    _quiet_console()
    try:
        job()
    except app.UsageError:
        raise  # absl prints the usage message
    except BaseException as err:  # noqa: BLE001 - every way out goes through _stop
        _stop(err)


# ------------------------------------------------------------------------------------------
# Errors and shutdown
# ------------------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story: bad configuration, data, workdir or
    file system (dpo_jax's RecordError and HFCheckpointError are ValueErrors). A traceback
    would only bury the message."""
    errors: list[type[BaseException]] = [ValueError, KeyError, OSError]
    for module, name in (("dpo_jax.train.workdir", "WorkdirError"),
                         ("dpo_jax.train.loop", "TrainingAborted")):  # fmt: skip
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]  # str(KeyError) would wrap the message in quotes
    if isinstance(err, OSError) and err.filename and err.strerror:
        # "[Errno 1] Operation not permitted: '/w/checkpoints/dpo/2.orbax-checkpoint-tmp'"
        return (f"{err.strerror}: {err.filename} ({type(err).__name__}). The run stopped; "
                "fix the cause and rerun the same command to resume from its last complete "
                "checkpoint.")  # fmt: skip
    return str(err) or type(err).__name__


def _stop(err: BaseException) -> None:
    """Reports `err`, releases what can be released within SHUTDOWN_TIMEOUT_S, and ends
    the process with a non-zero code, whatever threads are still running."""
    if isinstance(err, KeyboardInterrupt):
        code, text = EXIT_INTERRUPTED, "Interrupted."
    elif isinstance(err, SystemExit):  # sys.exit(...) somewhere: keep its code and text
        code = err.code if isinstance(err.code, int) else int(err.code is not None)
        text = err.code if isinstance(err.code, str) else None
    else:
        code = EXIT_FAILURE
        clean = isinstance(err, _user_errors())
        if _DEBUG.value or not clean:
            traceback.print_exception(err, file=sys.stderr)
        text = f"Error: {_message(err)}"
        if clean and not _DEBUG.value:
            text += "\n(rerun with --debug to see the traceback)"
    if text:
        print(text, file=sys.stderr, flush=True)
    _release(SHUTDOWN_TIMEOUT_S)
    os._exit(code)


def _release(timeout: float) -> None:
    """Closes open metric writers and checkpointers (pending saves of good state may still
    land), on a daemon thread: a save to a broken disk may block, and must not block exit."""

    def close():
        for module in ("dpo_jax.train.metrics", "dpo_jax.train.checkpoints"):
            if module in sys.modules:  # never import jax just to close nothing
                try:
                    sys.modules[module].close_all()
                except Exception as err:  # noqa: BLE001 - exiting anyway
                    print(f"({module}: {err})", file=sys.stderr)

    thread = threading.Thread(target=close, name="release-on-error", daemon=True)
    thread.start()
    thread.join(timeout)
    for handler in std_logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------
# Flags and console
# ------------------------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, plus a clear message for an unknown `--config.a.b` key (which
    ml_collections reports as a bare AttributeError: 'b')."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        if "--debug" in argv:
            traceback.print_exception(err, file=sys.stderr)
        sys.stderr.write(f"FATAL Flags parsing error: {_unknown_key_message(argv, err)}\n")
        sys.exit(EXIT_FAILURE)


def _unknown_key_message(argv: list[str], err: BaseException) -> str:
    """Names the first `--config.` override whose dotted path the config lacks."""
    try:
        config = _load_config(argv)
    except Exception:  # noqa: BLE001 - the config file's own error is reported by absl
        config = None
    overrides = [re.sub(r"^--?(no)?config\.", "", a.split("=", 1)[0]) for a in argv
                 if re.match(r"^--?(no)?config\.", a)]  # fmt: skip
    for dotted in overrides if config is not None else ():
        node, parts = config, dotted.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, ConfigDict) and part in node:
                node = node[part]
                continue
            parent = ".".join(["config", *parts[:i]])
            message = f"unknown config key --config.{dotted}: {parent} has no field {part!r}"
            if not isinstance(node, ConfigDict):
                return f"{message} (it is a {type(node).__name__}, not a group of fields)"
            fields = sorted(node.keys())
            if not fields:
                example = "{" + repr(part) + ": VALUE}"
                return (f"{message} (it is empty; set it whole: "
                        f'--{parent}="{example}")')  # fmt: skip
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return f"{message} ({hint}its fields: {', '.join(fields)})"
    return f"{type(err).__name__}: {err}"


def _load_config(argv: list[str]):
    """The config that `--config=PATH:ARG` names, loaded as ml_collections does."""
    for i, arg in enumerate(argv):
        if re.match(r"^--?config(=|$)", arg):
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            break
    else:
        return None
    path, _, config_arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_dpo_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()


def _quiet_console() -> None:
    """Warnings and dpo_jax's own INFO lines only, unless --verbosity was given (absl
    raises the default to INFO, and orbax logs every step of every save at INFO)."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("dpo_jax").setLevel(std_logging.INFO)
    for handler in std_logging.getLogger().handlers:
        handler.addFilter(_one_line_for_libraries)


def _one_line_for_libraries(record: std_logging.LogRecord) -> bool:
    """Drops the traceback of other libraries' error records (orbax logs a failed save
    three times, each with a traceback); the error itself is reported once, by `_stop`."""
    if record.exc_info and not record.name.startswith("dpo_jax"):
        record.exc_info, record.exc_text = None, None
    return True
