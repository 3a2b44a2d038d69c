"""Keeping the best checkpoints by a validation metric."""

from __future__ import annotations

import math
from typing import Any

from trainer import checkpoint as ckpt
from trainer.callbacks.stopping import monitored
from trainer.hooks import Callback
from trainer.run_dir import best_link, best_name, checkpoint_dir


class BestCheckpoints(Callback):
    """Keep the ``top_k`` checkpoints by ``monitor`` beside the periodic ones, as
    ``checkpoints/best-step-<step>-<metric>=<value>.pt``, with ``checkpoints/best.pt`` a hard link to
    the best of them. Each is a complete checkpoint: ``--resume`` takes it like any other. Under
    ``strategy: fsdp`` they are directories (no ``.pt``) and ``checkpoints/best`` a symbolic link."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", top_k: int = 1, state_key: str | None = None):
        self.state_key = state_key  # where checkpoints keep its state (default: the class name)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.monitor, self.mode, self.top_k = monitor, mode, top_k
        self.kept: list[tuple[float, int, str]] = []  # (value, step, file name), best first

    def on_validation_end(self, trainer, metrics: dict[str, float]) -> None:
        value = monitored(metrics, self.monitor, "BestCheckpoints")
        if trainer.run_dir is None or not math.isfinite(value):
            return
        directory = checkpoint_dir(trainer.run_dir)
        name = best_name(trainer.global_step, self.monitor, value, trainer.sharded)
        entry = (value, trainer.global_step, name)
        sign = 1.0 if self.mode == "min" else -1.0
        ranked = sorted(self.kept + [entry], key=lambda t: (sign * t[0], t[1]))  # best first, ties: earlier
        keep, drop = ranked[: self.top_k], ranked[self.top_k :]
        if entry in drop:
            return
        def written(path) -> None:  # once the new file is complete (checkpoint.async writes it later)
            for _, _, dropped in drop:
                ckpt.remove(directory / dropped)
            ckpt.link_best(directory / keep[0][2], directory / best_link(trainer.sharded))

        trainer.save_checkpoint(directory / name, rotate=False, on_written=written)
        self.kept = keep

    def state_dict(self) -> dict[str, Any]:
        return {"kept": [list(k) for k in self.kept]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = [tuple(k) for k in state["kept"]]
