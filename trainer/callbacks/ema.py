"""An exponential moving average of the weights, used for evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from trainer.freezing import ema_pairs, ema_update, frozen_copy
from trainer.hooks import Callback


class EMAWeights(Callback):
    """An exponential moving average of the weights (``frozen_copy`` + ``ema_update`` after every
    optimizer step), swapped into the model for every evaluation (``evaluation_weights``) and
    swapped back for training. Its weights are saved in checkpoints with the callback's state."""

    def __init__(self, decay: float = 0.999, state_key: str | None = None):
        self.state_key = state_key  # where checkpoints keep its state (default: the class name)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.ema: torch.nn.Module | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self._pairs: Any = None

    def on_fit_start(self, trainer) -> None:
        if trainer.sharded:
            # FSDP gathers parameters from its own shard buffers, so swapping storages would not
            # put the averaged weights into the forward pass.
            raise ValueError("EMAWeights does not support strategy: fsdp; use strategy: ddp")
        self._build(trainer)

    def _build(self, trainer) -> None:
        """The average, from the model or from a checkpoint's state; and the tensor lists one update
        works on, taken once (the swap exchanges storages, never these tensor objects)."""
        if self.ema is None:
            self.ema = frozen_copy(trainer.module)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None
        self._pairs = ema_pairs(self.ema, trainer.module)

    def on_before_zero_grad(self, trainer, optimizer) -> None:
        ema_update(self.ema, trainer.module, self.decay, pairs=self._pairs)

    def _swap(self, trainer) -> None:
        # Exchange the storages, not the values: no copy, and the optimizer keeps its parameters.
        for live, avg in zip(list(trainer.module.parameters()) + list(trainer.module.buffers()),
                             list(self.ema.parameters()) + list(self.ema.buffers())):
            live.data, avg.data = avg.data, live.data

    @contextlib.contextmanager
    def evaluation_weights(self, trainer) -> Iterator[None]:
        """The averaged weights in the model while ``trainer.evaluate`` runs (the run's validation or
        any other data), the trained ones back afterwards, also on an error."""
        if self.ema is None and self._pending is not None:
            self._build(trainer)  # loaded from a checkpoint, evaluated before any fit
        if self.ema is None:
            yield
            return
        self._swap(trainer)
        try:
            yield
        finally:
            self._swap(trainer)

    @property
    def weights_name(self) -> str | None:
        """``"ema"`` while it holds an average to swap in (what ``trainer eval`` reports), else None."""
        return "ema" if self.ema is not None or self._pending is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("ema") is not None:
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self._pending = state["ema"]
