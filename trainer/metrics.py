"""Logged values: kept as device tensors between log points, turned into floats at them.

On CUDA a ``.item()`` per step would make the CPU wait for the GPU every step; here the
values of a whole log interval are converted in one ``tolist()`` call at the log point.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.run_dir import METRICS_CSV, METRICS_JSONL


class Logger(Protocol):
    """A metric sink: receives every record (a flat dict of floats with ``step`` and ``epoch``)."""

    def log(self, record: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class MetricBuffer:
    """Values logged since the last log point; tensors stay on their device until ``flush``."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] = {}

    def put(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self._pending[name] = value

    def __bool__(self) -> bool:
        return bool(self._pending)

    def flush(self, extra: torch.Tensor | None = None, reduce: Any = None) -> tuple[dict[str, float], list[float] | None]:
        """All pending values as floats, plus ``extra`` (a 1-d tensor) as a list, with a single
        device-to-host copy for all of them. ``reduce`` (e.g. a mean over ranks) is applied to the
        tensor values first; they are taken in name order, the same on every rank."""
        pending, self._pending = self._pending, {}
        record: dict[str, float] = {}
        names: list[str] = []
        parts: list[torch.Tensor] = []
        for name, value in sorted(pending.items()):
            if isinstance(value, torch.Tensor):
                names.append(name)
                parts.append((value.double().mean() if value.ndim else value.double()).reshape(1))
            else:
                record[name] = float(value)
        if extra is not None:
            parts.append(extra.double())
        if not parts:
            return record, None
        device = parts[0].device
        # note: CPU-GPU sync point, once per log interval
        joined = torch.cat([p.to(device) for p in parts])
        values = (reduce(joined) if reduce is not None else joined).tolist()
        record.update(zip(names, values))
        return record, (values[len(names):] if extra is not None else None)


def _jsonable(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


class JsonlLogger:
    """One JSON object per record in ``metrics.jsonl``; NaN/Inf are written as strings."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict[str, float]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvLogger:
    """The same records as a CSV table; when a new column appears the file is rewritten."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.columns: list[str] = []
        self.rows: list[dict[str, float]] = []
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [{k: v for k, v in row.items() if v != ""} for row in reader]

    def log(self, record: dict[str, float]) -> None:
        self.rows.append(record)
        new = [k for k in record if k not in self.columns]
        if new:
            self.columns.extend(new)
            with self.path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with self.path.open("a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(record)

    def close(self) -> None:
        pass


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` and ``metrics.csv`` logged after ``step``."""
    run_dir = Path(run_dir)
    jsonl = run_dir / METRICS_JSONL
    if jsonl.exists():
        kept = []
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError):  # a line cut off by a crash
                continue
        jsonl.write_text("".join(kept), encoding="utf-8")
    table = run_dir / METRICS_CSV
    if table.exists():
        with table.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and float(row["step"]) <= step]
        with table.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
