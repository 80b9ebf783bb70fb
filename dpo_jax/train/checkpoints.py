"""Orbax checkpoints of a training stage: train state + data-iterator state, exact resume.

A checkpoint step directory holds two items:
  state: the TrainState pytree (step, params, opt_state, rng), restored with the shardings
         of the running job (so a run may resume on another mesh);
  data:  the input iterator's JSON state, so the next batch after resume is the batch the
         uninterrupted run would have seen.

Orbax writes each step to a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous step intact. `restore_latest` walks back from the
newest step and tells two kinds of bad steps apart:
  unreadable (bit rot, a truncated file copied by hand): skipped with a warning, the
      previous step is used, and the skipped steps are set aside, never deleted;
  incompatible (the tree structure, a shape or a dtype differs from this run's state: the
      checkpoint belongs to another model): `IncompatibleCheckpointError` stops the run,
      and nothing in the directory is touched.
A directory that holds steps never restarts from scratch (all unreadable: the run stops),
and a save never lands below a step already on disk, so a run cannot overwrite, interleave
with or (through keep-N cleanup) delete checkpoints it does not own.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from dpo_jax.train.workdir import WorkdirError

log = logging.getLogger(__name__)

_OPEN: weakref.WeakSet[StageCheckpointer] = weakref.WeakSet()


class IncompatibleCheckpointError(WorkdirError):
    """A checkpoint whose tree structure, shapes or dtypes do not fit the run's state."""


class StageCheckpointer:
    """Keep-N, async, atomic checkpoints of one stage under `directory`.

    Args:
      directory: absolute path, e.g. `<workdir>/checkpoints/dpo`.
      keep: how many recent steps to keep on disk.
      async_save: write in a background thread while training continues.
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = epath.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            # A crash mid-save leaves a tmp dir; remove it on start instead of tripping over it.
            cleanup_tmp_directories=True,
        )
        # Handlers (not just item names) so that `item_metadata` can read a step's tree of
        # shapes and dtypes without restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )
        self._disk_checked = False
        self._closed = False
        _OPEN.add(self)

    def all_steps(self) -> list[int]:
        self._manager.reload()  # other processes or an earlier run may have written steps
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves `state` and the JSON `data_state` at `step` (asynchronously if enabled).

        Raises WorkdirError instead of writing below a step already on disk: those steps
        belong to another timeline, and keep-N cleanup would delete them. Saving a step
        that exists is a no-op (returns False), as in orbax.
        """
        if not self._disk_checked:
            existing = self.all_steps()
            if existing and step < existing[-1]:
                raise WorkdirError(
                    f"refusing to save step {step} in {self.directory}: it holds steps "
                    f"{existing} of another attempt, which this one did not resume from. "
                    "Use a new --workdir."
                )
            self._disk_checked = True
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores step `step` into the structure, dtypes and shardings of `abstract_state`."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restores the newest readable step; returns (step, state, data_state), or None
        when the directory holds no step.

        An unreadable newest step is reported with a warning and the one before it is tried,
        so a corrupted checkpoint costs the steps since the previous save, not the run.
        Raises IncompatibleCheckpointError for a step that does not fit `abstract_state`,
        and WorkdirError when every step is unreadable.
        """
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            try:
                saved = self._saved_leaves(step)
            except Exception as err:  # noqa: BLE001 - any read failure means "try the previous one"
                failures.append(self._unreadable(step, err))
                continue
            self._check_fits(step, saved, abstract_state)
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - as above
                failures.append(self._unreadable(step, err))
                continue
            self._set_aside_steps_after(step)
            self._disk_checked = True
            return step, state, data_state
        if steps:
            raise WorkdirError(
                f"every checkpoint in {self.directory} is unreadable ("
                + "; ".join(failures)
                + "). They are left in place; restore them, or move the directory away to "
                "start this stage from scratch."
            )
        return None

    def _unreadable(self, step: int, err: Exception) -> str:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning(
            "Checkpoint %s/%d is unreadable (%s); falling back to the previous one.",
            self.directory,
            step,
            reason,
        )
        return f"step {step}: {reason}"

    def _saved_leaves(self, step: int) -> dict[tuple[str, ...], tuple[tuple, str]]:
        """{path: (shape, dtype)} of the `state` item of `step`, read from its metadata."""
        metadata = self._manager.item_metadata(step)["state"]
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise ValueError("no metadata for the state item")
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {_path(p): (tuple(m.shape), str(m.dtype)) for p, m in leaves}

    def _check_fits(self, step: int, saved: dict, abstract_state: Any) -> None:
        leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        wanted = {_path(p): (tuple(x.shape), str(jax.numpy.dtype(x.dtype))) for p, x in leaves}
        if wanted == saved:
            return
        differing = [p for p in wanted if saved.get(p) != wanted[p]]
        differing += [p for p in saved if p not in wanted]
        first = differing[0]

        def show(leaf):
            return "absent" if leaf is None else f"shape {leaf[0]} {leaf[1]}"

        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {self.directory} does not fit this run's model: "
            f"{'.'.join(first)} is {show(saved.get(first))} in the checkpoint but "
            f"{show(wanted.get(first))} in this run ({len(differing)} of {len(wanted)} leaves "
            "differ). It was written by another configuration; it is left untouched. Use a "
            "new --workdir (or the config that wrote it)."
        )

    def _set_aside_steps_after(self, step: int) -> None:
        """Moves unreadable steps newer than `step` to `<directory>/unreadable/` (kept for
        inspection, never deleted): the resumed run will save those step numbers again."""
        newer = [s for s in self.all_steps() if s > step]
        if not newer:
            return
        if jax.process_index() == 0:
            aside = self.directory / "unreadable"
            aside.mkdir(parents=True, exist_ok=True)
            for s in newer:
                target = aside / f"{s}.{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / str(s)).rename(target)
                log.warning("Moved unreadable checkpoint step %d to %s.", s, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("unreadable checkpoints set aside")
        self._manager.reload()

    def check(self) -> None:
        """Raises the error of a finished background save that failed (call it now and then:
        otherwise a failed async save surfaces only at the next save)."""
        self._manager.check_for_errors()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads, even when a save failed
        (the failure is raised after the threads are released)."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()


def close_all() -> None:
    """Closes every open checkpointer, logging failures instead of raising: for a process
    that stops on an error (run it in a thread with a deadline: a save to a broken disk
    may block)."""
    for checkpointer in list(_OPEN):
        try:
            checkpointer.close()
        except Exception as err:  # noqa: BLE001 - stopping anyway; report and go on
            # Usually the error that stopped the process, which reports it itself.
            log.debug("Closing the checkpoints in %s: %s", checkpointer.directory, err)


def _path(keys) -> tuple[str, ...]:
    """A tree path as names, the same for a dataclass/namedtuple field, a dict key and an
    index whether the tree is the running state or orbax's metadata (dicts and lists)."""
    names = []
    for k in keys:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return tuple(names)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
