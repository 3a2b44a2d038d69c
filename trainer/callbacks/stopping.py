"""Ending a run when a validation metric stops improving."""

from __future__ import annotations

import math
from typing import Any

from trainer.hooks import Callback


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations.

    The run ends (``trainer.stop``) at the optimizer-step boundary after that evaluation, with its
    final checkpoint, and ``trainer.stop_reason`` says why.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0,
                 state_key: str | None = None):
        self.state_key = state_key  # where checkpoints keep its state (default: the class name)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1 or min_delta < 0:
            raise ValueError(f"patience must be >= 1 and min_delta >= 0, got {patience} and {min_delta}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.best_step = 0
        self.wait = 0

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def on_validation_end(self, trainer, metrics: dict[str, float]) -> None:
        value = monitored(metrics, self.monitor, "EarlyStopping")
        if self._improved(value):
            self.best, self.best_step, self.wait = value, trainer.global_step, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.stop(
                f"early stopping: {self.monitor} did not improve by more than {self.min_delta} for "
                f"{self.patience} evaluations (best {self.best:.6g} at step {self.best_step})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.wait = state["best"], state["best_step"], state["wait"]


def monitored(metrics: dict[str, float], monitor: str, who: str) -> float:
    if monitor not in metrics:
        raise KeyError(f"{who} monitors {monitor!r}, but validation reported {sorted(metrics) or 'nothing'}")
    return metrics[monitor]
