"""Built-in callbacks."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from trainer import checkpoint as ckpt
from trainer import distributed
from trainer.hooks import Callback
from trainer.run_dir import best_link, best_name, checkpoint_dir
from trainer.freezing import ema_pairs, ema_update, frozen_copy


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

    def on_after_backward(self, trainer) -> None:
        if (trainer.global_step + 1) % self.every_n_steps:
            return
        named = [(n, p.grad) for n, p in trainer.module.named_parameters() if p.grad is not None]
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
        value = _monitored(metrics, self.monitor, "EarlyStopping")
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


def _monitored(metrics: dict[str, float], monitor: str, who: str) -> float:
    if monitor not in metrics:
        raise KeyError(f"{who} monitors {monitor!r}, but validation reported {sorted(metrics) or 'nothing'}")
    return metrics[monitor]


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
        value = _monitored(metrics, self.monitor, "BestCheckpoints")
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


class ThroughputMonitor(Callback):
    """Adds ``tokens_per_sec`` (when batches hold token ids: an integer ``(batch, time)`` first tensor)
    and ``mfu`` (model FLOPs utilisation: achieved FLOP/s over ``peak_flops``) at each log point.

    FLOPs per token (or sample) come from ``flops_per_sample`` or the model's ``flops_per_token()``.

    Deprecated: every run logs ``tokens_per_sec`` and ``mfu`` itself (``trainer.timing``), from
    ``throughput: {peak_flops, flops_per_sample}`` in the config.
    """

    def __init__(self, peak_flops: float | None = None, flops_per_sample: float | None = None):
        warnings.warn("ThroughputMonitor is deprecated: every run logs tokens_per_sec and mfu; give peak_flops and "
                      "flops_per_sample as throughput: {peak_flops: ..., flops_per_sample: ...} in the config "
                      "(Trainer(config={'throughput': {...}}) from code) and drop the callback",
                      FutureWarning, stacklevel=2)
        self.peak_flops, self.flops_per_sample = peak_flops, flops_per_sample
        self._tokens = 0
        self._clock = 0.0

    def on_fit_start(self, trainer) -> None:
        import time

        self._clock = time.perf_counter()
        if self.flops_per_sample is None and hasattr(trainer.module, "flops_per_token"):
            self.flops_per_sample = float(trainer.module.flops_per_token())

    def on_train_batch_start(self, trainer, batch) -> None:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(first, torch.Tensor) and first.ndim == 2 and not first.is_floating_point():
            self._tokens += first.numel()  # shape only: no sync

    def on_log(self, trainer, record) -> None:
        import time

        if "train/loss" not in record:
            return
        now = time.perf_counter()
        elapsed, self._clock = max(now - self._clock, 1e-9), now
        per_sec = self._tokens / elapsed if self._tokens else record.get("samples_per_sec", 0.0)
        if self._tokens:
            record["tokens_per_sec"] = per_sec
        self._tokens = 0
        if self.flops_per_sample and self.peak_flops:
            record["mfu"] = per_sec * self.flops_per_sample / self.peak_flops
