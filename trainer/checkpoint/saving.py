"""A run's checkpoints: when one is due, where it goes, writing it, rotating old ones.

Inside ``fit`` with ``checkpoint.async`` a save returns once the state is copied into CPU memory
and a thread writes it; a save waits for the write before it, and ``fit`` for the last
(``release``). A stop signal that arrives during a save lets the checkpoint (or its copy) finish
first (``deferred``, from the run's stop signals).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from trainer import run_dir as run_files
from trainer.checkpoint.files import rotate as rotate_files
from trainer.checkpoint.state import Checkpointer
from trainer.config import CheckpointConfig
from trainer.parallel import distributed


class RunCheckpoints:
    def __init__(self, checkpointer: Checkpointer, run_dir: Path | None, settings: CheckpointConfig,
                 deferred: Callable[[], contextlib.AbstractContextManager], main: bool, sharded: bool):
        self.checkpointer, self.run_dir, self.settings = checkpointer, run_dir, settings
        self.deferred, self.main, self.sharded = deferred, main, sharded
        self.background = False  # checkpoint.async, while fit's loop runs

    def claim(self, overwrite: bool) -> None:
        """Before a fresh fit: it never appends to another run's metrics or replaces its checkpoints."""
        earlier = run_files.earlier_run(self.run_dir) if self.run_dir is not None else []
        if not earlier:
            return
        if not overwrite:
            raise FileExistsError(
                f"run_dir {self.run_dir} already holds a run ({', '.join(earlier)}); continue it with "
                "fit(resume_from=<checkpoint>), replace it with fit(overwrite=True), or pass another run_dir"
            )
        if self.main:
            run_files.remove_run_outputs(self.run_dir)
        distributed.barrier()

    def due(self, step: int) -> bool:
        every = self.settings.every_n_steps
        return bool(every) and step % every == 0

    def save(self, step: int, path: str | Path | None = None, rotate: bool = True,
             on_written: Callable[[Path], None] | None = None) -> Path | None:
        """See ``Trainer.save_checkpoint``."""
        if self.run_dir is None:
            raise ValueError("save_checkpoint() needs a run_dir: Trainer(..., run_dir='runs/my-run')")
        directory = run_files.checkpoint_dir(self.run_dir)
        path = Path(path) if path is not None else directory / run_files.checkpoint_name(step, self.sharded)
        keep_last = self.settings.keep_last

        def written() -> None:  # rank 0, once the checkpoint is complete: rotation never meets a partial one
            if rotate:
                rotate_files(directory, keep_last)
            if on_written is not None:
                on_written(path)

        try:
            with self.deferred():  # a second stop signal lets the checkpoint (or its copy) finish first
                self.checkpointer.save(path, self.main, step, background=self.background,
                                       on_written=written if self.main else None)
        finally:
            distributed.barrier()  # no rank runs ahead of a checkpoint that is not complete (or copied)
        return path if self.main else None

    def release(self) -> None:
        """The last background write is on disk, or raises its error."""
        self.background = False
        with self.deferred():
            self.checkpointer.release()

    def finish(self) -> None:
        """On the way out of fit with an exception: a checkpoint being written in the background is
        finished, and its own failure is reported beside the exception that ends the run."""
        try:
            self.release()
        except Exception as error:
            print(f"trainer: {error}", file=sys.stderr, flush=True)


__all__ = ["RunCheckpoints"]
