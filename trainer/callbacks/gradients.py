"""Gradient norms at every N steps, as metrics and histograms."""

from __future__ import annotations

import math
import warnings

import torch

from trainer.hooks import Callback
from trainer.parallel import distributed


class GradNormLogger(Callback):
    """Logs ``grad_norm/total`` (and ``grad_norm/<param>`` with ``per_layer``) every N steps.

    Runs at ``on_after_backward``, where gradients are final and unscaled. All norms come from
    one fused ``torch._foreach_norm`` call and stay on the device until the log point. When the
    total is NaN/Inf it names the first parameter whose gradient is not finite.
    """

    def __init__(self, every_n_steps: int = 50, per_layer: bool = False, histograms: bool = False):
        if every_n_steps < 1:
            raise ValueError(f"GradNormLogger every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.histograms = histograms  # per-parameter gradient histograms to loggers that take them
        self._names: list[str] = []
        self._norms: torch.Tensor | None = None
        self._parameters: list[tuple[str, torch.nn.Parameter]] | None = None

    def on_fit_start(self, trainer) -> None:
        self._parameters = None  # named again: a fit may follow a change of the model

    def on_after_backward(self, trainer) -> None:
        if (trainer.global_step + 1) % self.every_n_steps:
            return
        if self._parameters is None:  # walking the modules costs as much as the norms: once per fit
            self._parameters = list(trainer.module.named_parameters())
        named = [(n, g) for n, p in self._parameters if (g := p.grad) is not None]
        if not named:
            return
        self._names = [n for n, _ in named]
        norms = distributed.norms([g for _, g in named])  # under fsdp: over all shards, one all-reduce
        self._norms = norms
        trainer.log("grad_norm/total", torch.linalg.vector_norm(norms))
        if self.per_layer:
            for name, norm in zip(self._names, norms.unbind()):
                trainer.log(f"grad_norm/{name}", norm)
        if self.histograms:
            # Histograms go to the host whole: only on these steps, never between them. Under fsdp
            # they show rank 0's shard of each gradient.
            for logger in trainer.loggers:
                if hasattr(logger, "log_histogram"):
                    for name, grad in named:
                        logger.log_histogram(f"grad/{name}", distributed.local(grad), trainer.global_step + 1)

    def on_log(self, trainer, record: dict[str, float]) -> None:
        total = record.get("grad_norm/total")
        if total is None or math.isfinite(total) or self._norms is None:
            return
        # Error path only: one more sync to find the culprit.
        values = self._norms.tolist()
        bad = next((n for n, v in zip(self._names, values) if not math.isfinite(v)), "?")
        warnings.warn(
            f"step {int(record['step'])}: gradient norm is {total}; first non-finite gradient: {bad}",
            stacklevel=2,
        )
