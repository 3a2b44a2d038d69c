"""Where a run's log records go: its ``history``, the ``on_log`` hook, and the loggers.

With a run directory, each ``fit`` opens ``metrics.jsonl`` and ``metrics.csv`` there (a later fit
appends to them) and puts them first among the loggers; a tracker opens its run (the checkpoint's,
on resume) when ``fit`` starts. ``fit`` closes only the files it opened: the user's loggers are the
user's to close. Only rank 0 logs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainer import run_dir as run_files
from trainer.observability.metrics import CsvLogger, JsonlLogger, Logger


class Records:
    def __init__(self, loggers: Sequence[Logger], run_dir: Path | None, main: bool, config: dict[str, Any],
                 on_log: Callable[[dict[str, float]], None]):
        self.loggers: list[Logger] = list(loggers) if main else []
        self.history: list[dict[str, float]] = []
        self.logged_records = 0  # records sent to the loggers in the whole run, resumes included (checkpointed)
        self.run_dir, self.main, self.config, self.on_log = run_dir, main, config, on_log
        self._opened: list[Logger] = []

    def open(self) -> None:
        """At the start of ``fit``: the metric files."""
        if self.run_dir is not None and self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._opened = [JsonlLogger(self.run_dir / run_files.METRICS_JSONL),
                            CsvLogger(self.run_dir / run_files.METRICS_CSV)]
            self.loggers[:0] = self._opened

    def start(self) -> None:
        """Then each logger's ``start(config)``, with the run's config."""
        for logger in self.loggers:
            if callable(getattr(logger, "start", None)):  # a tracker opens its run (the checkpoint's, on resume)
                logger.start(self.config)

    def close(self) -> None:
        """At the end of ``fit``: the metric files it opened."""
        for logger in self._opened:
            logger.close()
            self.loggers.remove(logger)
        self._opened = []

    def emit(self, record: dict[str, float]) -> None:
        self.history.append(record)
        self.logged_records += 1
        self.on_log(record)
        for logger in self.loggers:
            logger.log(record)


__all__ = ["Records"]
