"""How a run shows its progress: a tqdm bar for a terminal, plain lines for a log file. Both are
callbacks that show only values the log point has already turned into numbers, so neither makes
the host wait for the device.

Epochs are shown counted from 1 ("epoch 3/30"), as people count them; the ``epoch`` of a record
(and ``Trainer.epoch``) counts from 0: "epoch 3/30" is the record whose ``epoch`` is 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from trainer.hooks import Callback


def epoch_text(epoch: int, total: int | None) -> str:
    """``epoch`` (from 0, as records hold it) as people read it: ``epoch 3/30``, or ``epoch 3``."""
    return f"epoch {epoch + 1}/{total}" if total is not None else f"epoch {epoch + 1}"


def step_text(step: int, total: int | None) -> str:
    return f"step {step}/{total}" if total is not None else f"step {step}"


def for_mode(mode: str) -> Callback | None:
    """The callback for the ``progress`` setting; ``auto`` is the bar when stderr is a terminal (a
    person watches) and lines otherwise (nohup, a batch scheduler, ``| tee``)."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    if mode == "bar":
        return ProgressBar(force=True)
    if mode == "lines":
        return ProgressLines()
    return None


def _is_train_record(record: dict[str, float]) -> bool:
    return "samples_per_sec" in record  # every log point has it; a validation record does not


def _validation_values(record: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith("val/")}


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps on stderr: steps/s and ETA every step; the epoch, the loss
    and the latest validation metrics as of the last log point or validation (reading the loss in
    between would be a host sync). Validation shows a second bar over its batches while it runs.
    Off when stderr is not a terminal, unless ``force``."""

    def __init__(self, force: bool = False):
        self.force = force
        self.bar = None
        self.val_bar = None
        self._epochs: int | None = None
        self._loss: float | None = None
        self._val: dict[str, float] = {}

    def on_fit_start(self, trainer) -> None:
        if not trainer.is_main_process or not (self.force or sys.stderr.isatty()):
            return
        self._epochs = trainer.total_epochs()
        self.bar = tqdm(total=trainer.total_steps(), initial=trainer.global_step, unit="step", dynamic_ncols=True,
                        desc=epoch_text(trainer.epoch, self._epochs))

    def on_train_epoch_start(self, trainer) -> None:
        if self.bar is not None:
            self.bar.set_description(epoch_text(trainer.epoch, self._epochs), refresh=False)

    def on_before_zero_grad(self, trainer, optimizer) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_log(self, trainer, record) -> None:
        if self.bar is not None and "train/loss" in record:
            self._loss = record["train/loss"]
            self._show(refresh=False)

    def validation_batches(self, trainer, batches: Iterable[Any], total: int | None) -> Iterator[Any]:
        """The run's validation batches, passed on unchanged, counted on a second bar."""
        if self.bar is None:
            yield from batches
            return
        self.val_bar = tqdm(total=total, desc="validation", unit="batch", leave=False, dynamic_ncols=True)
        try:
            for item in batches:
                yield item
                self.val_bar.update()
        finally:
            self._close_val_bar()

    def on_validation_end(self, trainer, metrics) -> None:
        if self.bar is not None:
            self._val = dict(metrics)
            self._show(refresh=True)  # validation is rare: show its result at once

    def _show(self, refresh: bool) -> None:
        shown = {"loss": self._loss} if self._loss is not None else {}
        shown.update(self._val)
        self.bar.set_postfix_str(", ".join(f"{k}={v:.4g}" for k, v in shown.items()), refresh=refresh)

    def on_fit_end(self, trainer) -> None:
        self._close()

    def on_exception(self, trainer, exc) -> None:
        self._close()

    def _close_val_bar(self) -> None:
        if self.val_bar is not None:
            self.val_bar.close()
            self.val_bar = None

    def _close(self) -> None:
        self._close_val_bar()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ProgressLines(Callback):
    """One plain line per log point (step, epoch, loss, learning rate, samples/s) and one per
    validation (its metrics), on stdout and flushed at once, so that a log file read while the run
    goes (``nohup``, a batch scheduler, ``| tee``) is up to date. Rank 0 only."""

    def __init__(self, stream=None):
        self.stream = stream  # None: sys.stdout as it is when a line is written
        self._show = False
        self._steps: int | None = None
        self._epochs: int | None = None

    def on_fit_start(self, trainer) -> None:
        self._show = trainer.is_main_process
        self._steps, self._epochs = trainer.total_steps(), trainer.total_epochs()

    def on_log(self, trainer, record) -> None:
        if self._show:
            print(self.line(record), file=self.stream or sys.stdout, flush=True)

    def line(self, record: dict[str, float]) -> str:
        parts = [step_text(int(record["step"]), self._steps), epoch_text(int(record["epoch"]), self._epochs)]
        if not _is_train_record(record):
            parts += [f"{k} {v:.4g}" for k, v in _validation_values(record).items()]
            return "  ".join(parts)
        if "train/loss" in record:
            parts.append(f"loss {record['train/loss']:.4g}")
        parts += [f"{k} {v:.4g}" for k, v in record.items() if k.startswith("train/") and k != "train/loss"]
        parts.append(f"lr {record['lr']:.3g}")
        parts.append(f"{record['samples_per_sec']:,.0f} samples/s")
        return "  ".join(parts)
