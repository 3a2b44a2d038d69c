"""Telemetry: the one object the training loop tells where it is, and that makes the log records.

The loop takes its micro-batches from ``batches`` (around the data source; it moves each onto the
device) and calls, per micro-batch, ``computed`` and, at the end of an accumulation window,
``stepped``; at a log point ``record``.
Nothing in these per-step calls waits for the device: losses and metrics stay device tensors in the
``LogInterval`` and the ``MetricBuffer``, and the log point turns them all into floats in one copy.
They run for every micro-batch, so each does its part in one call: a clock reading added to its
phase's sum and the interval's counts; what the sums make of a record (``timing.StepTimes``) is
worked out at the log point.

A record holds ``step`` and ``epoch``; the log interval's ``train/loss``, ``train/<extra>`` and
``samples_per_sec``; the values given to ``log`` (``Trainer.log``); the shares of wall time
(``trainer.observability.timing``); and what the sources registered when the Trainer was built
add: ``before_copy`` sources put values into the buffer that is copied to the host (each
optimizer's ``lr``), ``after_copy`` sources return host values to add (peak memory,
recompilations).
"""

from __future__ import annotations

from time import perf_counter  # bound once: the loop reads the clock per micro-batch
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch

from trainer.observability.metrics import LogInterval, MetricBuffer
from trainer.observability.timing import StepTimes
from trainer.parallel import distributed


class Flags(Protocol):
    """Per-step flags kept on the device between log points (the non-finite guard's)."""

    def pending(self) -> torch.Tensor | None: ...

    def read(self, flags: list[float]) -> None: ...

    def took_steps(self) -> bool: ...


class Telemetry:
    def __init__(self, device: torch.device, times: StepTimes, guard: Flags):
        self.device = device
        self.interval = LogInterval(device)  # saved in checkpoints: a resumed run logs the same numbers
        self.metrics = MetricBuffer()
        self.times = times
        self.guard = guard  # its unread device flags go to the host in the log point's one copy
        self.before_copy: list[Callable[[MetricBuffer], None]] = []
        self.after_copy: list[Callable[[], dict[str, float]]] = []
        self.on_first_step: list[Callable[[], None]] = []
        self._first_step_clock: float | None = None
        # The host clock over the log interval: seconds waiting for data, computing and in the
        # optimizer step, summed per micro-batch; the marks they are measured from; and the step the
        # interval started after (time/step_s).
        self._data = self._compute = self._optimizer = 0.0
        self._mark = perf_counter()  # where the phase in progress began
        self._first_step = 0
        self._gpu = times.gpu  # CUDA events around each step, or None

    @classmethod
    def for_run(cls, device: torch.device, times: StepTimes, guard: Flags, optimizers: Sequence[Any],
                recompiles: Any = None) -> Telemetry:
        """A run's telemetry with its sources: each optimizer's ``lr`` (the others' as ``lr/<i>``),
        CUDA's peak memory, and with ``recompiles`` (a counter with ``start()`` and ``count()``, when
        the model is compiled) ``compile/recompiles``, counted from the end of the first step."""
        telemetry = cls(device, times, guard)

        def learning_rates(metrics: MetricBuffer) -> None:
            metrics.put("lr", optimizers[0].param_groups[0]["lr"])
            for i, opt in enumerate(optimizers[1:], start=1):
                metrics.put(f"lr/{i}", opt.param_groups[0]["lr"])

        telemetry.register(before_copy=learning_rates)
        if device.type == "cuda":
            telemetry.register(after_copy=lambda: {"cuda_peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30})
        if recompiles is not None:
            telemetry.register(after_copy=lambda: {"compile/recompiles": recompiles.count()},
                               on_first_step=recompiles.start)
        return telemetry

    def register(self, before_copy: Callable[[MetricBuffer], None] | None = None,
                 after_copy: Callable[[], dict[str, float]] | None = None,
                 on_first_step: Callable[[], None] | None = None) -> None:
        """A source of record values (see the module), or ``on_first_step``: called once the first,
        separately timed step (``start(time_first_step=True)``) has ended."""
        if before_copy is not None:
            self.before_copy.append(before_copy)
        if after_copy is not None:
            self.after_copy.append(after_copy)
        if on_first_step is not None:
            self.on_first_step.append(on_first_step)

    def start(self, step: int, time_first_step: bool) -> None:
        """A ``fit`` starts after ``step``. With ``time_first_step`` (compilation) the first step is
        timed on its own as ``time/first_step_s``, and throughput counts from its end."""
        now = perf_counter()
        self._first_step_clock = now if time_first_step else None
        self.interval.clock = now
        self._restart(step)

    def _restart(self, step: int) -> None:
        """The host clock's sums of a new interval, after ``step``."""
        self._data = self._compute = self._optimizer = 0.0
        self._first_step = step

    # ----------------------------------------------------------------- the loop's calls, per micro-batch

    def batches(self, source: Iterable[Any], move: Callable[[Any], Any] | None) -> Iterator[Any]:
        """``source``'s batches, each moved onto the device by ``move`` (``None``: they are there
        already): the time from the start of its fetch to the end of its move was data."""
        clock, gpu = perf_counter, self._gpu
        fetch_start = clock()
        for batch in source:
            if move is not None:
                batch = move(batch)
            now = clock()
            self._data += now - fetch_start
            self._mark = now
            if gpu is not None:
                gpu.start()  # no-op after a step's first micro-batch
            yield batch
            fetch_start = clock()

    def computed(self, batch: Any, outputs: Any, loss: torch.Tensor | None = None,
                 count: torch.Tensor | None = None) -> None:
        """Forward and backward of a micro-batch are done: its loss (a mean, or with ``count`` a sum
        over items) and ``outputs``' extra values join the interval; without ``loss`` (``manual_step``)
        the returned values alone."""
        if loss is None:
            self.interval.track_metrics(outputs, batch)
        elif count is None:
            self.interval.track(loss, outputs, batch)
        else:
            self.interval.track_sum(loss, count, outputs, batch)
        now = perf_counter()
        self._compute += now - self._mark
        self._mark = now

    def step_loss(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The loss of the step in progress (summed over its micro-batches), and its item count for summed losses."""
        return self.interval.step_loss, self.interval.step_count

    def last_batch(self, global_step: int) -> tuple[Any, int]:
        """The latest micro-batch and the optimizer step it belongs to (``global_step`` steps are done)."""
        return self.interval.last_batch, global_step + (1 if self.interval.step_micro else 0)

    def stepped(self, skipped: bool | torch.Tensor, step: int) -> None:
        """Optimizer step ``step``, the window's, is done (launched, on CUDA); ``skipped`` leaves its
        loss out. The end of a separately timed first step."""
        self.interval.end_step(skipped)
        self._optimizer += perf_counter() - self._mark
        if self._gpu is not None:
            self._gpu.end()
        if self._first_step_clock is not None:
            self._end_first_step(step)

    def _end_first_step(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # note: CPU-GPU sync point, once, to time compilation
        now = perf_counter()
        self.metrics.put("time/first_step_s", now - self._first_step_clock)
        self._first_step_clock = None
        self.interval.clock, self.interval.samples = now, 0  # throughput without the compile
        self._restart(step)
        for fn in self.on_first_step:
            fn()

    # ----------------------------------------------------------------- log points

    def log(self, name: str, value: Any) -> None:
        self.metrics.put(name, value)

    def record(self, step: int, epoch: int) -> dict[str, float] | None:
        """The log point: every pending value becomes a float in one copy; ``None`` when nothing
        happened since the last one."""
        interval = self.interval
        if not interval.micro_batches and not self.metrics:
            return None
        record: dict[str, float] = {"step": step, "epoch": epoch}
        now = perf_counter()  # one reading: samples/s, tokens/s and the time shares share their interval
        times = self.times.close(interval.clock, now, step - self._first_step,
                                 (self._data, self._compute, self._optimizer), interval.samples, interval.last_batch)
        self._restart(step)
        samples_per_sec = interval.put(self.metrics, now)
        for put in self.before_copy:
            put(self.metrics)
        reduce = distributed.mean_over_ranks if distributed.active() else None
        values, flags = self.metrics.flush(extra=self.guard.pending(), reduce=reduce)
        # (note: the flush is the CPU-GPU sync point of the log interval)
        record.update(values)
        if flags is not None:
            self.guard.read(flags)
        if not self.guard.took_steps() or record.get("train/count") == 0:
            # Every step of the interval was skipped, or (summed losses) its steps held no item:
            # no loss to show.
            record.pop("train/loss", None)
        record["samples_per_sec"] = samples_per_sec
        record.update(times)
        record.update(self.times.gpu_busy())  # the GPU's events, complete since the copy
        for values_of in self.after_copy:
            record.update(values_of())
        return record


__all__ = ["Telemetry"]
