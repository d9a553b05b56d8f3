"""The trainer's event interface.

The training loop knows nothing about MLflow, Ray or terminals: it calls these hooks and
whoever is plugged in (console progress, MLflow tracking, Ray Tune reporting) reacts. All
metric values are plain floats. Hooks run on the main process (rank 0) only.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lejepa.record import (
    COLLAPSE_RATIO,
    EPOCH_IMAGES_PER_SEC,
    EPOCH_INVARIANCE,
    EPOCH_LOSS,
    EPOCH_SIGREG,
    EPOCH_TIME_S,
    EVAL_PREFIX,
    ONLINE_TEST_ACC,
    PROJ_RANK,
    TRAIN_LOSS,
    TRAIN_LR,
    VERDICT,
    VERDICTS,
)


@dataclass
class RunInfo:
    """What callbacks learn at the start of training."""

    config: Any  # lejepa.config.Config
    run_dir: Path
    start_epoch: int  # epochs already done (0 unless resumed)
    start_step: int
    steps_per_epoch: int
    total_steps: int
    device: str
    world_size: int
    num_params: int


class Callback:
    """Base class: override the hooks you need. Raising from a hook stops training."""

    def on_train_start(self, info: RunInfo) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``train.log_every`` steps: loss, invariance, sigreg, lr, probe loss."""

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """After each epoch (1-based ``epoch``), before its checkpoint is written."""

    def on_checkpoint(self, epoch: int, step: int, path: Path, metrics: dict[str, float]) -> None:
        """A checkpoint directory was written atomically at ``path``."""

    def on_train_end(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Final evaluation metrics (linear probe, kNN) and the last checkpoint."""

    def on_failure(self, error: BaseException) -> None:
        """Training raised; the exception is re-raised after the callbacks ran."""


class CallbackList(Callback):
    """Fans every event out to several callbacks, in order."""

    def __init__(self, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, info: RunInfo) -> None:
        for cb in self.callbacks:
            cb.on_train_start(info)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(step, metrics)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, step, metrics)

    def on_checkpoint(self, epoch: int, step: int, path: Path, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(epoch, step, path, metrics)

    def on_train_end(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        for cb in self.callbacks:
            cb.on_train_end(metrics, checkpoint)

    def on_failure(self, error: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_failure(error)


def health_text(metrics: dict[str, float]) -> str:
    """``  collapse 0.12  rank 0.85  healthy`` from an epoch's health metrics ('' without them)."""
    if VERDICT not in metrics:
        return ""
    return f"  collapse {metrics[COLLAPSE_RATIO]:.2f}  rank {metrics[PROJ_RANK]:.2f}  {VERDICTS[int(metrics[VERDICT])]}"


class ConsoleProgress(Callback):
    """One line per epoch, plus a step line at most every ``interval`` seconds within long epochs."""

    def __init__(self, stream: TextIO | None = None, interval: float = 15.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._info: RunInfo | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_train_start(self, info: RunInfo) -> None:
        self._info = info
        self._last = time.monotonic()
        cfg = info.config
        resumed = f", resumed at epoch {info.start_epoch}" if info.start_epoch else ""
        self._print(
            f"lejepa: {cfg.model.arch} ({info.num_params / 1e6:.2f} M params) on {cfg.data.name} "
            f"@ {cfg.data.resolution}px, λ={cfg.loss.lam}, M={cfg.loss.num_slices}, {cfg.train.epochs} epochs × "
            f"{info.steps_per_epoch} steps, device {info.device} × {info.world_size}{resumed}\n"
            f"lejepa: run folder {info.run_dir}"
        )

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self._last < self.interval or self._info is None:
            return
        self._last = now
        total = self._info.total_steps
        self._print(
            f"  step {step}/{total} ({100 * step / total:.0f}%)  loss {metrics[TRAIN_LOSS]:.4f}  lr {metrics[TRAIN_LR]:.2e}"
        )

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self._last = time.monotonic()
        total = self._info.config.train.epochs if self._info else "?"
        probe = metrics.get(ONLINE_TEST_ACC)
        probe_txt = f"  probe {100 * probe:.1f}%" if probe is not None else ""
        self._print(
            f"epoch {epoch}/{total}  loss {metrics[EPOCH_LOSS]:.4f}  inv {metrics[EPOCH_INVARIANCE]:.4f}  "
            f"sigreg {metrics[EPOCH_SIGREG]:.4f}{probe_txt}{health_text(metrics)}  "
            f"{metrics[EPOCH_IMAGES_PER_SEC]:.0f} img/s  {metrics[EPOCH_TIME_S]:.1f}s"
        )

    def on_train_end(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        parts = [f"{k.split('/')[-1]} {100 * v:.1f}%" for k, v in metrics.items() if k.startswith(EVAL_PREFIX)]
        self._print("final: " + "  ".join(parts) + (f"\ncheckpoint: {checkpoint}" if checkpoint else ""))
