"""The progress bar: a callback over optimizer steps that never waits for the device."""

from __future__ import annotations

import sys

from trainer.hooks import Callback


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps: steps/s and ETA every step, the loss at log points only
    (reading it in between would be a host sync). Off when stderr is not a terminal."""

    def __init__(self, force: bool = False):
        self.force = force
        self.bar = None

    def on_fit_start(self, trainer) -> None:
        if not trainer.is_main_process or not (self.force or sys.stderr.isatty()):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.total_steps(), initial=trainer.global_step, unit="step", dynamic_ncols=True)

    def on_before_zero_grad(self, trainer, optimizer) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_log(self, trainer, record) -> None:
        if self.bar is not None and "train/loss" in record:
            self.bar.set_postfix(loss=f"{record['train/loss']:.4g}", epoch=int(record["epoch"]), refresh=False)

    def on_fit_end(self, trainer) -> None:
        self._close()

    def on_exception(self, trainer, exc) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
