"""Orbax checkpoints of a training stage: train state + data-iterator state, exact resume.

A checkpoint step directory holds two items:
  state: the TrainState pytree (step, params, opt_state, rng), restored with the shardings
         of the running job (so a run may resume on another mesh);
  data:  the input iterator's JSON state, so the next batch after resume is the batch the
         uninterrupted run would have seen.

Orbax writes each step to a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous step intact. A step that is complete on disk but
unreadable (bit rot, a truncated file copied by hand) is skipped with a warning and the
previous one is used: `restore_latest` walks back from the newest step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


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
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data"), options=options
        )

    def all_steps(self) -> list[int]:
        self._manager.reload()  # other processes or an earlier run may have written steps
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves `state` and the JSON `data_state` at `step` (asynchronously if enabled)."""
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
        """Restores the newest readable step; returns (step, state, data_state) or None.

        An unreadable newest step is reported with a warning and the one before it is tried,
        so a corrupted checkpoint costs the steps since the previous save, not the run.
        """
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - any read failure means "try the previous one"
                log.warning(
                    "Checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one.",
                    self.directory,
                    step,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
                continue
            self._set_aside_steps_after(step)
            return step, state, data_state
        return None

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

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
