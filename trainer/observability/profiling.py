"""``profile:``: a torch.profiler trace of a few optimizer steps, and a CUDA memory snapshot on out-of-memory.

The profiler exists only around the configured steps: it is built at the boundary before the first
warmup step and stopped after the last traced one, so every other step runs without it. A traced
step spans from its data fetch to the end of its log point, validation and checkpoint; the trace's
``ProfilerStep#N`` markers carry the logged step numbers. Each rank writes its own trace,
``<run_dir>/profile/rank<R>.<time_ns>.pt.trace.json``: Chrome trace JSON, which TensorBoard (with
torch-tb-profiler, ``--logdir <run_dir>/profile``) and https://ui.perfetto.dev read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerAction, ProfilerActivity

from trainer import memory
from trainer.config import ProfileConfig
from trainer.device import out_of_memory_message

PROFILE_DIR = "profile"


def _records_cuda_memory(device: torch.device) -> bool:
    return device.type == "cuda"


class RunProfiler:
    """The trace and the memory snapshot of one ``fit``. ``begin`` and ``end`` bracket the loop;
    ``at_boundary(next_step)`` runs between optimizer steps when it ``traces``; ``out_of_memory``
    writes the snapshot."""

    def __init__(self, settings: ProfileConfig | None, device: torch.device, run_dir: Path | None, rank: int):
        self.settings = settings
        self.device = device
        self.rank = rank
        self.directory = run_dir / PROFILE_DIR if run_dir is not None else None
        self._profiler: torch.profiler.profile | None = None
        self._recording_memory = False
        self.traces = not (settings is None or settings.start_step is None)  # else at_boundary has nothing to do
        if not self.traces:
            self._first = self._stop = 0  # no trace: no step is ever in range
        else:
            warmup = min(settings.warmup, settings.start_step - 1)
            self._first = settings.start_step - warmup  # the profiler runs from here (warmup first)
            self._stop = settings.start_step + settings.steps  # and is stopped before this step
        if settings is not None and self.directory is None and (self._stop or settings.memory_snapshot_on_oom):
            raise ValueError("profile needs a run_dir for its files: Trainer(..., run_dir='runs/my-run'), or "
                             "profile: null")

    def _action(self, step: int) -> ProfilerAction:
        """The profiler's schedule, over the run's step numbers."""
        start, last = self.settings.start_step, self._stop - 1
        if step < self._first or step > last:
            return ProfilerAction.NONE
        if step < start:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD_AND_SAVE if step == last else ProfilerAction.RECORD

    def begin(self, next_step: int, last_step: int | None = None) -> None:
        """At the start of fit, ``next_step`` the step about to run, ``last_step`` the run's last
        (``None`` when the length of the data is unknown)."""
        start = self.settings.start_step if self.settings is not None else None
        if start is not None and last_step is not None and start > last_step:
            warnings.warn(f"profile.start_step {start} is past the run's last step {last_step}: no trace will be "
                          f"written; set profile.start_step to {last_step} or less", stacklevel=3)
        if self.settings is not None and self.settings.memory_snapshot_on_oom:
            if _records_cuda_memory(self.device):
                torch.cuda.memory._record_memory_history(max_entries=self.settings.memory_snapshot_entries)
                self._recording_memory = True
            else:
                warnings.warn(f"profile.memory_snapshot_on_oom records CUDA memory only; ignored on {self.device.type}",
                              stacklevel=3)
        self.at_boundary(next_step)

    def at_boundary(self, next_step: int, last: bool = False) -> None:
        """Between optimizer steps: start, advance or stop the profiler. ``last``: the run ends here,
        so no step follows (none is opened: the trace holds only steps that ran)."""
        if self._profiler is not None:
            if last:
                self._close_profiler()
                return
            self._profiler.step()  # a step whose action is RECORD_AND_SAVE writes the trace here
            if next_step >= self._stop:
                self._close_profiler()
        elif self._first <= next_step < self._stop:
            self._start(next_step)

    def _start(self, next_step: int) -> None:
        s = self.settings
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        profiler = torch.profiler.profile(
            activities=activities, schedule=self._action,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.directory), worker_name=f"rank{self.rank}"),
            record_shapes=s.record_shapes, profile_memory=s.profile_memory, with_stack=s.with_stack,
        )
        # The step markers carry the run's step numbers (as torchtitan's profiler does): started on the
        # step before, whose action is NONE (records nothing), then advanced into next_step.
        profiler.step_num = next_step - 1
        profiler.start()
        profiler.step()
        self._profiler = profiler

    def _close_profiler(self) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.stop()  # a trace cut short (the run ended inside it) is written here

    def out_of_memory(self) -> Path | None:
        """Write the allocator's history to ``profile/memory-oom-rank<R>.pickle``; its path, or None
        when it was not recorded."""
        if not self._recording_memory:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"memory-oom-rank{self.rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def out_of_memory_error(self, exc: BaseException, step: int, config: Any, module: nn.Module) -> torch.OutOfMemoryError:
        """``exc`` restated with the run's batch, accumulation and precision (a ``TrainerConfig``), the
        device's memory, what to try, and the memory snapshot written now (when recorded)."""
        message = out_of_memory_message(exc, self.device, step, config.batch_size, config.grad_accum_steps,
                                        config.precision, memory.suggestion(module, config.activation_checkpointing))
        return torch.OutOfMemoryError(message + snapshot_note(self.out_of_memory()))

    def end(self) -> None:
        """At the end of fit (also on an exception): stop the profiler and the memory recording."""
        if self._profiler is not None:
            self._close_profiler()
        if self._recording_memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False


def snapshot_note(path: Path | None) -> str:
    return f" Memory snapshot: {path} (drag it into https://pytorch.org/memory_viz)." if path is not None else ""


__all__ = ["PROFILE_DIR", "RunProfiler", "snapshot_note"]
