"""Where a step's time goes, measured at no sync: logged at every log point.

Shares of the log interval's wall time (they sum to 1), measured on the host with
``time.perf_counter`` (three calls per micro-batch, one more per optimizer step, which
``Telemetry`` makes as the loop tells it where it is, and sums by phase):

- ``time/data``: waiting for the next batch (the loader's ``next()``) and moving it to the device;
- ``time/compute``: ``training_step`` (forward) and ``backward``, with their hooks;
- ``time/optimizer``: the optimizer step: gradient checks, clipping, ``step``, the scheduler, ``zero_grad``;
- ``time/other``: the rest: log points, validation, checkpoints, progress, end-of-batch hooks.

On CUDA, kernels run asynchronously: the host-side shares say where the *host* spent its time
(launching kernels, or waiting where it must), not how long the GPU took. ``time/gpu_busy`` says
that: the share of the interval during which the GPU was working on training steps, from CUDA
events recorded around each step (after its first batch reached the device, after its optimizer
step) and read at the log point, whose flush has waited for the GPU already. A low
``time/gpu_busy`` with a high ``time/data`` is a GPU waiting for the loader.

Also ``time/step_s`` (wall seconds per optimizer step), ``tokens_per_sec`` (this rank's, like
``samples_per_sec``: the element count of a batch's first tensor when that is an integer tensor
of two or more dimensions, token ids) and ``mfu`` (model FLOPs utilisation: ``flops_per_sample``
times samples per second, or the model's ``flops_per_token()`` times tokens per second, over the
device's peak FLOP/s, when both are known).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.config import ThroughputConfig
from trainer.data.batches import batch_size_of, first_tensor

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by a part of the device
# name; the first match wins, so a longer name comes before its prefix (A100 before A10).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16
    ("T4", 65e12),  # fp16
)


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """The bf16/fp16 peak of a GPU named ``device_name`` from ``PEAK_FLOPS``; None under fp32 (whose
    peak depends on TF32 settings) or for a device the table lacks."""
    if precision == "fp32":
        return None
    for part, peak in PEAK_FLOPS:
        if part.lower() in device_name.lower():
            return peak
    return None


def tokens_in(batch: Any) -> int:
    """The tokens of a batch: the element count of its first tensor when that holds integer ids of
    two or more dimensions (``(batch, sequence)``); 0 otherwise. Read from the shape: no sync."""
    first = first_tensor(batch)
    if first is None or first.ndim < 2 or first.is_floating_point() or first.is_complex() or first.dtype == torch.bool:
        return 0
    return first.numel()


def is_timing(name: str) -> bool:
    """Whether a logged value is a measurement of time, which differs from run to run."""
    return name.startswith("time/") or name in ("samples_per_sec", "tokens_per_sec", "mfu")


class _GpuSpans:
    """CUDA events around each training step, reused interval after interval (a pool that grows to
    the longest interval once). Nothing here waits for the GPU."""

    def __init__(self) -> None:
        self._pool: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._used = 0  # closed spans of the interval
        self._open = False

    def _span(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if self._used == len(self._pool):
            self._pool.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        return self._pool[self._used]

    def start(self) -> None:
        if not self._open:
            self._span()[0].record()
            self._open = True

    def end(self) -> None:
        if self._open:
            self._span()[1].record()
            self._used += 1
            self._open = False

    def busy_seconds(self) -> float | None:
        """The GPU seconds of the interval's closed spans, then a new interval; None when there is
        none, or when the GPU has not finished the last one (which the log point's flush has waited
        for, when the interval logged a tensor)."""
        used, pool = self._used, self._pool
        done = used > 0 and pool[used - 1][1].query()  # query() asks, it does not wait
        busy = sum(start.elapsed_time(end) for start, end in pool[:used]) / 1000 if done else None
        self._used = 0
        if self._open:  # a step in progress carries over, into the first place
            pool[0], pool[used] = pool[used], pool[0]
        return busy


class StepTimes:
    """The time values of a log interval's record: the shares of the host clock's sums by phase,
    which ``Telemetry`` keeps per micro-batch, and the GPU's busy time from ``gpu``'s spans, which
    it starts and ends around each step (see the module)."""

    def __init__(self, device: torch.device, flops_per_sample: float | None, peak_flops: float | None,
                 flops_per_token: float | None = None):
        self.gpu = _GpuSpans() if device.type == "cuda" else None
        self._wall = 0.0
        self.flops_per_sample = flops_per_sample
        self.flops_per_token = flops_per_token  # used when flops_per_sample is unknown and batches hold tokens
        self.peak_flops = peak_flops

    def close(self, clock: float, now: float, steps: int, phases: tuple[float, float, float], samples: int,
              last_batch: Any) -> dict[str, float]:
        """The host-side values of an interval from its ``clock`` (its start) to ``now`` that held
        ``steps`` optimizer steps, ``phases`` (its seconds of data, compute and optimizer),
        ``samples`` and ``last_batch``."""
        wall = max(now - clock, 1e-9)
        self._wall = wall
        record: dict[str, float] = {}
        if steps > 0:
            data, compute, optimizer = phases
            shares = {"time/data": data / wall, "time/compute": compute / wall, "time/optimizer": optimizer / wall}
            record.update(shares)
            record["time/other"] = max(0.0, 1.0 - sum(shares.values()))
            record["time/step_s"] = wall / steps
        if last_batch is not None and samples:
            # Token ids per sample as in the last batch: batches differ in how many samples they hold
            # (an epoch's short last one), not in their sequence length.
            tokens_per_sec = samples * tokens_in(last_batch) / batch_size_of(last_batch) / wall
            if tokens_per_sec:
                record["tokens_per_sec"] = tokens_per_sec
            if self.peak_flops is not None:
                if self.flops_per_sample is not None:
                    record["mfu"] = self.flops_per_sample * samples / wall / self.peak_flops
                elif self.flops_per_token is not None and tokens_per_sec:
                    record["mfu"] = self.flops_per_token * tokens_per_sec / self.peak_flops
        return record

    def gpu_busy(self) -> dict[str, float]:
        """``time/gpu_busy`` of the interval ``close`` ended; after the log point's flush (CUDA only)."""
        if self.gpu is None:
            return {}
        busy = self.gpu.busy_seconds()
        return {} if busy is None else {"time/gpu_busy": min(busy / self._wall, 1.0)}


def for_run(settings: ThroughputConfig, module: torch.nn.Module, device: torch.device, precision: str) -> StepTimes:
    """The run's ``StepTimes``: ``flops_per_sample`` from the config, else the model's attribute of
    that name, else its ``flops_per_token()`` (``CharTransformer`` has one, as ``ThroughputMonitor``
    reads it) for batches of tokens; ``peak_flops`` from the config, else (CUDA) the table."""
    flops = settings.flops_per_sample
    if flops is None:
        flops = getattr(module, "flops_per_sample", None)
        if flops is not None and (isinstance(flops, bool) or not isinstance(flops, (int, float)) or flops <= 0):
            raise TypeError(f"{type(module).__name__}.flops_per_sample must be a positive number (the FLOPs of one "
                            f"training sample, forward and backward), got {flops!r}")
    per_token = None
    if flops is None and callable(getattr(module, "flops_per_token", None)):
        per_token = float(module.flops_per_token())
    peak = settings.peak_flops
    if peak is None and device.type == "cuda":
        peak = table_peak_flops(torch.cuda.get_device_name(device), precision)
    return StepTimes(device, flops, peak, per_token)

__all__ = ["PEAK_FLOPS", "StepTimes", "for_run", "is_timing", "table_peak_flops", "tokens_in"]
