"""Metrics out of a run: JSON lines, TensorBoard events, optional W&B, a tqdm progress bar.

Only process 0 writes; every process may call the methods. Each record carries the stage
and step, so `metrics.jsonl` of a multi-stage run reads as one table.
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

_OPEN: weakref.WeakSet[MetricWriter] = weakref.WeakSet()


def to_python(metrics: Mapping) -> dict[str, float]:
    """Device scalars -> Python floats (one host transfer for the whole dict)."""
    host = jax.device_get(dict(metrics))
    return {k: float(np.asarray(v)) for k, v in host.items()}


class MetricWriter:
    """Writes `<workdir>/metrics.jsonl` and TensorBoard events under `<workdir>/tensorboard`."""

    def __init__(self, workdir: str, *, wandb_project: str = "", config: dict | None = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            import wandb  # optional dependency: only imported when asked for

            self._wandb = wandb.init(project=wandb_project, config=config, dir=workdir)
        _OPEN.add(self)

    def drop_after(self, stage: str, step: int) -> None:
        """Forgets records of `stage` past `step`: after a resume they are re-logged.

        Without this a run killed between two checkpoints would list those steps twice.
        """
        if not self.active or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if not (r.get("stage") == stage and r.get("step", 0) > step)]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"stage": stage, "step": int(step), "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:  # None once closed
            for name, value in metrics.items():
                self._tb.add_scalar(f"{stage}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        """Flushes and closes the writers (idempotent); W&B is finished even if TensorBoard
        fails to close."""
        _OPEN.discard(self)
        tb, wandb_run, self._tb, self._wandb = self._tb, self._wandb, None, None
        try:
            if tb is not None:
                tb.close()
        finally:
            if wandb_run is not None:
                wandb_run.finish()


def close_all() -> None:
    """Closes every open MetricWriter, logging failures instead of raising: for a process
    that stops on an error (TensorBoard's writer thread would otherwise keep it alive)."""
    for writer in list(_OPEN):
        try:
            writer.close()
        except Exception as err:  # noqa: BLE001 - stopping anyway; report and go on
            log.warning("Closing the metric writers of %s: %s", writer.path, err)


class ProgressBar:
    """tqdm bar over a stage's steps showing loss, accuracy, tokens/s and the ETA."""

    def __init__(self, stage: str, total: int, initial: int, enabled: bool):
        self._bar = None
        self._last_time = time.perf_counter()
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=stage, dynamic_ncols=True)

    def update(self, steps: int, metrics: Mapping[str, float], tokens: float) -> float:
        """Advances by `steps` steps that processed `tokens` tokens; returns tokens/s."""
        now = time.perf_counter()
        tokens_per_sec = tokens / max(now - self._last_time, 1e-9)
        self._last_time = now
        if self._bar is not None:
            shown = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{tokens_per_sec:.0f}"}
            if "rewards/accuracies" in metrics:
                shown["acc"] = f"{metrics['rewards/accuracies']:.3f}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(steps)
        return tokens_per_sec

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
