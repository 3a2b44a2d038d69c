"""Logged values: kept as device tensors between log points, turned into floats at them.

On CUDA a ``.item()`` per step would make the CPU wait for the GPU every step; here the
values of a whole log interval are converted in one ``tolist()`` call at the log point.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from trainer.parallel import distributed
from trainer.data.batches import batch_size_of
from trainer.losses import COUNT, SUM
from trainer.run_dir import METRICS_CSV, METRICS_JSONL, write_text_atomic

if TYPE_CHECKING:
    from trainer.data.batches import BatchLayout


class Logger(Protocol):
    """A metric sink: receives every record (a flat dict of floats with ``step`` and ``epoch``).

    A logger may also define ``start(config)``, which ``fit`` calls before the first record with the
    resolved config (a tracker opens its run there), and ``state_dict()`` / ``load_state_dict(state)``,
    kept in checkpoints under its ``state_key`` (default: its class name), as a callback's state is."""

    def log(self, record: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class MetricBuffer:
    """Values logged since the last log point; tensors stay on their device until ``flush``."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] = {}

    def put(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value = value.detach()
        self._pending[name] = value

    def __bool__(self) -> bool:
        return bool(self._pending)

    def flush(self, extra: torch.Tensor | None = None, reduce: Any = None) -> tuple[dict[str, float], list[float] | None]:
        """All pending values as floats, plus ``extra`` (a 1-d tensor) as a list, with a single
        device-to-host copy for all of them. ``reduce`` (e.g. a mean over ranks; ``None`` with one
        process) is applied to the tensor values first; they are taken in name order, the same on
        every rank."""
        pending, self._pending = self._pending, {}
        record: dict[str, float] = {}
        names: list[str] = []
        values: list[torch.Tensor] = []
        for name, value in sorted(pending.items()):
            if isinstance(value, torch.Tensor):
                names.append(name)
                values.append(value.double().mean() if value.ndim else value)
            else:
                record[name] = float(value)
        if reduce is None and extra is None and values and values[0].device.type == "cpu":
            # On the CPU a read of each value is cheaper than gathering them into one tensor first.
            record.update((name, float(value.item())) for name, value in zip(names, values))
            return record, None
        parts = [_stacked(values)] if values else []
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


class LogInterval:
    """The log interval in progress: the current step's loss, the interval's loss over the steps
    taken, extra metrics over its micro-batches, counts and the clock. Saved in checkpoints (every
    rank's part), so a resumed run logs the same numbers as an uninterrupted one.

    A step's loss is either a mean per micro-batch (``track``; ``train/loss`` is then their mean
    over the interval) or a sum with its item count (``track_sum``, see ``trainer.losses``;
    ``train/loss`` is then the interval's sum over every rank divided by its count, logged as
    ``train/count``). One interval holds one kind."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_loss: torch.Tensor | None = None  # summed over the current step's micro-batches
        self.step_micro = 0
        self.step_count: torch.Tensor | None = None  # summed losses: the current step's items (float64)
        self.summed: bool | None = None  # whether the interval's losses are sums (None: nothing tracked yet)
        self.loss_sum: torch.Tensor | None = None  # over the interval's steps taken
        # Their micro-batches (a device tensor when decided there); for summed losses their items
        # on every rank (a float64 device tensor).
        self.loss_count: int | torch.Tensor = 0
        self.micro_batches = 0  # every micro-batch of the interval, taken or skipped
        # Their samples since the clock started, each batch counted at its own size (an epoch's short
        # last batch too); not saved: a resumed run's clock starts at its resume.
        self.samples = 0
        self.extra_sums: dict[str, Any] = {}
        self.extra_count = 0
        self.last_batch: Any = None
        self.clock = time.perf_counter()

    def track(self, loss: torch.Tensor, outputs: Any, batch: Any) -> None:
        """One micro-batch's loss and extra metrics (``outputs`` when it is a dict)."""
        if self.summed:
            raise _mixed("a mean 'loss'", "'loss_sum'")
        self.summed = False
        value = loss.detach()
        if value.ndim:
            value = value.mean()  # a non-scalar loss is logged as its mean
        if value.itemsize < 4:
            # A bf16 loss (bf16-true) is summed in fp32: bf16 sums would round, and a resume restores fp32.
            value = value.float()
        self.step_loss = value if self.step_loss is None else self.step_loss + value
        self.step_micro += 1
        self.samples += batch_size_of(batch)
        self.last_batch = batch
        if isinstance(outputs, dict):  # extra metrics: also means over the log interval
            sums = self.extra_sums
            self.extra_count += 1
            for name, extra in outputs.items():
                if name != "loss":
                    if isinstance(extra, torch.Tensor):
                        extra = extra.detach()
                        if extra.is_floating_point() and extra.itemsize < 4:
                            extra = extra.float()  # summed in fp32, as the loss
                    sums[name] = sums[name] + extra if name in sums else extra

    def track_metrics(self, outputs: dict[str, Any] | None, batch: Any) -> None:
        """One micro-batch of ``manual_step``: its returned values (``None``: nothing), each averaged
        over the interval's micro-batches like a training step's extra metrics; no ``train/loss`` of
        its own (a returned ``"loss"`` is one of the values)."""
        self.step_micro += 1
        self.samples += batch_size_of(batch)
        self.last_batch = batch
        if outputs is None:
            return
        sums = self.extra_sums
        self.extra_count += 1
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
                if value.ndim:
                    value = value.mean()
                if value.is_floating_point() and value.itemsize < 4:
                    value = value.float()  # summed in fp32, as the loss
            sums[name] = sums[name] + value if name in sums else value

    def track_sum(self, loss_sum: torch.Tensor, count: torch.Tensor, outputs: dict[str, Any], batch: Any) -> None:
        """One micro-batch's summed loss, its item count (scalar tensors) and extra metrics."""
        if self.summed is False:
            raise _mixed("'loss_sum'", "a mean 'loss'")
        self.summed = True
        value = loss_sum.detach().float()
        if self.step_loss is None:
            # A copy: the count is summed over the ranks in place at the step.
            self.step_loss, self.step_count = value, count.detach().to(self.device, torch.float64, copy=True)
        else:
            self.step_loss, self.step_count = self.step_loss + value, self.step_count + count.detach()
        self.step_micro += 1
        self.samples += batch_size_of(batch)
        self.last_batch = batch
        sums = self.extra_sums
        self.extra_count += 1
        for name, extra in outputs.items():
            if name not in (SUM, COUNT):
                extra = extra.detach() if isinstance(extra, torch.Tensor) else extra
                sums[name] = sums[name] + extra if name in sums else extra

    def end_step(self, skipped: bool | torch.Tensor) -> None:
        """Close the current step: its loss counts unless it was skipped (``skipped`` is a bool
        decided on the host, or a bool tensor decided on the device, with no sync). For summed
        losses ``step_count`` must hold the step's items over every rank by now (``_step`` sums it)."""
        loss, micro, count = self.step_loss, self.step_micro, self.step_count
        self.step_loss, self.step_micro, self.step_count = None, 0, None
        self.micro_batches += micro
        if skipped is True:
            return
        if count is not None:
            micro = count
        if skipped is not False:  # decided on the device (a 0/1 flag): a skipped step adds zeros
            taken = skipped == 0
            loss = torch.where(taken, loss, 0.0)
            micro = micro * taken
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_count = self.loss_count + micro

    def put(self, metrics: MetricBuffer, now: float) -> float:
        """Put ``train/loss`` and ``train/<extra>`` into ``metrics``, start a new interval at ``now``
        (``time.perf_counter()``), and return the closed one's samples per second: its own samples
        over its own time."""
        if self.loss_sum is not None and self.summed:
            # Each rank's sum over the count of every rank: the mean over ranks at the log point
            # makes it the sum over every rank's items divided by their count. A count of 0 (no
            # item in the interval) logs no loss (see Telemetry.record).
            count = self.loss_count
            metrics.put("train/loss", self.loss_sum * (distributed.world_size() / torch.where(count > 0, count, 1.0)))
            metrics.put("train/count", count)
        elif self.loss_sum is not None:
            metrics.put("train/loss", self.loss_sum / self.loss_count)
        for name, total in self.extra_sums.items():
            metrics.put(f"train/{name}", total / self.extra_count)
        rate = self.samples / max(now - self.clock, 1e-9)
        self.loss_sum, self.loss_count, self.micro_batches, self.samples, self.clock = None, 0, 0, 0, now
        self.extra_sums, self.extra_count, self.summed = {}, 0, None
        return rate

    def state_dict(self) -> dict[str, Any]:
        """Every rank's sums (one gather, at checkpoints only), for the ``trainer_state``."""
        names = sorted(self.extra_sums)
        extras = [torch.as_tensor(self.extra_sums[n]).double().mean() for n in names]
        loss = self.loss_sum.double() if self.loss_sum is not None else torch.zeros((), dtype=torch.float64)
        mine = torch.stack([t.cpu() for t in [loss, *extras]]).tolist()  # note: CPU-GPU sync point, per checkpoint
        ranks = distributed.all_gather_floats([float(self.loss_sum is not None), *mine], self.device)
        return {
            "loss_sums": [r[1] if r[0] else None for r in ranks],
            "loss_count": 0 if self.summed else _count(self.loss_count),  # micro-batches, of mean losses
            "summed": self.summed,
            "item_count": float(self.loss_count) if self.summed else 0.0,  # items, of summed losses
            "micro_batches": self.micro_batches,
            "extra_sums": [dict(zip(names, r[2:])) for r in ranks],
            "extra_types": {n: str(v.dtype) if isinstance(v, torch.Tensor) else "float" for n, v in self.extra_sums.items()},
            "extra_count": self.extra_count,
        }

    @staticmethod
    def regroup(state: dict[str, Any], saved: BatchLayout, now: BatchLayout) -> dict[str, Any]:
        """The saved interval as ``now.world_size`` ranks with ``now.grad_accum_steps`` micro-batches
        a step would hold it (``saved`` and ``now``: ``BatchLayout``s of one global batch), so that
        the next log point logs what the uninterrupted run logs. Mean losses: every new rank takes
        the saved ranks' mean sum, and sums and counts of micro-batches scale with the micro-batches
        per step (one step adds ``grad_accum_steps`` micro-batch means on each rank; their mean over
        ranks is the step's loss times that number). Summed losses: the ranks' sum over every item
        is shared out equally; the item count stays."""
        factor = now.grad_accum_steps / saved.grad_accum_steps
        ranks = now.world_size
        sums = [s for s in state["loss_sums"] if s is not None]
        if not sums:
            loss = None
        elif state.get("summed"):
            loss = math.fsum(sums) / ranks
        else:
            loss = math.fsum(sums) / len(sums) * factor
        extras = state["extra_sums"]
        extra = {name: math.fsum(e[name] for e in extras) / len(extras) * factor for name in extras[0]}
        return {
            **state,
            "loss_sums": [loss] * ranks,
            "loss_count": _count(state["loss_count"] * factor),
            "micro_batches": round(state.get("micro_batches", state["loss_count"]) * factor),
            "extra_sums": [extra] * ranks,
            "extra_count": _count(state["extra_count"] * factor),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank = distributed.rank()
        rank = rank if rank < len(state["loss_sums"]) else 0  # fewer ranks than saved
        loss = state["loss_sums"][rank]
        self.loss_sum = torch.tensor(loss, device=self.device) if loss is not None else None
        self.summed = state.get("summed")
        self.loss_count = (torch.tensor(state["item_count"], dtype=torch.float64, device=self.device) if self.summed
                           else state["loss_count"])
        self.micro_batches = state.get("micro_batches", state["loss_count"])
        self.extra_sums = {
            name: value if state["extra_types"][name] == "float"
            else torch.tensor(value, dtype=getattr(torch, state["extra_types"][name].removeprefix("torch.")),
                              device=self.device)
            for name, value in state["extra_sums"][rank].items()
        }
        self.extra_count = state["extra_count"]


def _stacked(values: list[torch.Tensor]) -> torch.Tensor:
    """Scalar tensors as one float64 tensor, each converted exactly (an int64 count too), in one op."""
    out = torch.empty(len(values), dtype=torch.float64, device=values[0].device)
    try:
        return torch.stack(values, out=out)
    except RuntimeError:  # a value on another device (a CPU tensor logged during a CUDA run)
        return torch.stack([v.to(out.device) for v in values], out=out)


def _count(value: Any) -> int | float:
    """A count of micro-batches as saved: an integer, unless regrouping made it a fraction (an
    epoch's short last step counted at another accumulation)."""
    value = float(value)  # note: CPU-GPU sync point for a count decided on the device, per checkpoint
    return int(value) if value.is_integer() else value


def _mixed(this: str, earlier: str) -> TypeError:
    return TypeError(
        f"training_step returned {this} after {earlier} in the same log interval; return one kind on every "
        "micro-batch (a mean 'loss', or 'loss_sum' with 'count' for a mean over items)"
    )


def _jsonable(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


class JsonlLogger:
    """One JSON object per record in ``metrics.jsonl``; NaN/Inf are written as strings."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")
        if _ends_mid_line(self.path):
            # A crash cut the last line off: the next record starts on a line of its own instead of
            # being glued to it (readers skip the cut-off line, truncate_metrics drops it).
            self._file.write("\n")
            self._file.flush()

    def log(self, record: dict[str, float]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvLogger:
    """The same records as a CSV table. A record with a new column rewrites the file (atomically:
    a crash leaves the old table or the new one), any other is appended."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.columns, rows, complete = _read_csv(self.path)
        self.rows: list[dict[str, Any]] = [{k: v for k, v in zip(self.columns, row) if v != ""} for row in rows]
        # A row cut off by a crash is gone from self.rows; appending after it would glue the next
        # row to it, so the next record rewrites the file instead.
        self._rewrite = not complete

    def log(self, record: dict[str, float]) -> None:
        self.rows.append(record)
        new = [k for k in record if k not in self.columns]
        if new or self._rewrite:
            self.columns.extend(new)
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
            write_text_atomic(self.path, text.getvalue())
            self._rewrite = False
        else:
            with self.path.open("a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(record)

    def close(self) -> None:
        pass


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty file's last line lacks its newline (it was being written when the
    process died)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _read_csv(path: Path) -> tuple[list[str], list[list[str]], bool]:
    """The columns and complete rows of a metrics table, and whether every row was complete.

    Every row the loggers write has one field per column and ends with a newline. A last line
    without its newline was cut off by a crash, perhaps inside a number that still parses (step
    ``12`` cut to ``1``), so it is dropped; so is any row whose field count differs from the header's.
    """
    if not path.exists():
        return [], [], True
    with path.open(newline="", encoding="utf-8") as f:
        text = f.read()
    complete = not text or text.endswith("\n")
    if not complete:
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text))
    columns = next(reader, [])
    rows = []
    for row in reader:
        if len(row) == len(columns):
            rows.append(row)
        else:
            complete = False
    return columns, rows, complete


def _step_at_most(value: Any, step: int) -> bool:
    try:
        return float(value) <= step
    except (TypeError, ValueError):
        return False


def truncate_metrics(run_dir: str | Path, step: int, records: int | None = None) -> None:
    """Drop the records of ``metrics.jsonl`` and ``metrics.csv`` logged after ``step`` (after the
    first ``records`` records, when a checkpoint counted them: an evaluation logged after the
    checkpoint of its own step goes too), and any line a crash cut off. Each file is replaced
    atomically, and only when something is dropped: a crash during a resume leaves every file
    whole, and the next resume truncates it again."""
    limit = records if records is not None else float("inf")
    run_dir = Path(run_dir)
    jsonl = run_dir / METRICS_JSONL
    if jsonl.exists():
        text = jsonl.read_text(encoding="utf-8")
        kept = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut off by a crash
                continue
            # A cut can't leave a line that parses: the closing brace comes last. So a last line
            # that parses but lacks its newline is whole, and kept.
            if isinstance(record, dict) and _step_at_most(record.get("step"), step) and len(kept) < limit:
                kept.append(line + "\n")
        if "".join(kept) != text:
            write_text_atomic(jsonl, "".join(kept))
    table = run_dir / METRICS_CSV
    if table.exists():
        columns, rows, complete = _read_csv(table)
        kept_rows = [row for row in rows if "step" in columns and _step_at_most(row[columns.index("step")], step)]
        kept_rows = kept_rows[:records] if records is not None else kept_rows
        if not complete or len(kept_rows) != len(rows):
            text = io.StringIO()
            writer = csv.writer(text)
            if columns:
                writer.writerow(columns)
            writer.writerows(kept_rows)
            write_text_atomic(table, text.getvalue())
