"""A disk that fills up during a run: ``FillDisk``, named in a test's config."""

import errno
import os
from pathlib import Path

from trainer import Callback


class FillDisk(Callback):
    """After optimizer step ``step``, once the checkpoint write in flight (``checkpoint.async``) is on
    disk, fill the file system of the run directory up to its last ``leave`` bytes: room for a log
    line, none for a checkpoint. Once: the ``marker`` file remembers it was done."""

    def __init__(self, step: int, marker: str, leave: int = 8192):
        self.step, self.marker, self.leave = step, Path(marker), leave

    def on_train_batch_end(self, trainer, outputs, batch):
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.touch()
        trainer._checkpointer.wait()
        with open(trainer.run_dir.parent / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            f.truncate(max(0, os.fstat(f.fileno()).st_size - self.leave))
