"""What happens when a step's loss is NaN or Inf: ``on_nonfinite: error | skip``.

Two ways to look, chosen once per run:

* on the host (CPU runs, and any run whose optimizer is not fused): the step's loss is read before
  the optimizer step, so a bad step never reaches the weights. On CPU that costs well under a
  microsecond; on CUDA it would be a sync per step, hence:
* on the device (CUDA with a fused optimizer, ``fused=True``, and no fp16 scaler): each step writes
  its "not finite" flag into a small device buffer and hands it to the optimizer as ``found_inf``,
  which makes the fused kernel leave weights and optimizer state untouched for that step. The host
  reads the buffer at the next log point, with the logged metrics, and then errors or warns naming
  the first bad step. No host sync per step.
"""

from __future__ import annotations

import math
import warnings

import torch

CAPACITY = 4096  # flags kept on the device between two reads


class NonFiniteGuard:
    def __init__(self, policy: str, max_consecutive: int, optimizer: torch.optim.Optimizer,
                 device: torch.device, fp16: bool, on_device: bool | None = None):
        self.policy, self.max_consecutive = policy, max_consecutive
        self.optimizer = optimizer
        self.device = device
        if on_device is None:
            fused = all(group.get("fused") for group in optimizer.param_groups)
            on_device = device.type == "cuda" and fused and not fp16
        self.on_device = on_device
        self.consecutive = 0  # length of the current run of non-finite steps
        self.skipped = 0  # non-finite steps skipped in the whole run
        self._flags: torch.Tensor | None = None
        self._unread = 0
        self._step = 0  # the step the first unread flag belongs to, minus one

    def start(self, step: int, consecutive: int, skipped: int, log_every: int) -> None:
        self.consecutive, self.skipped, self._step, self._unread = consecutive, skipped, step, 0
        if self.on_device:
            self._flags = torch.zeros(min(log_every, CAPACITY), device=self.device)

    def allow(self, step_loss: torch.Tensor, step: int) -> bool:
        """Before optimizer step ``step``: may it run? (On the device it always runs and skips itself.)"""
        if self.on_device:
            if self._unread == len(self._flags):
                self.read(self.pending().tolist())  # note: CPU-GPU sync point, only if log interval > CAPACITY
            found = self._flags.select(0, self._unread)
            torch.logical_not(torch.isfinite(step_loss), out=found)
            self._unread += 1
            self.optimizer.found_inf = found  # read by fused optimizers: skip this step on the device
            return True
        value = step_loss.item()  # on CPU this is a plain read, nothing to wait for
        self._step = step
        if math.isfinite(value):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        self._act(step, value, f"stopped before the optimizer step; the weights are those of step {step - 1}",
                  1, self.consecutive)
        return False

    def done(self) -> None:
        if self.on_device:
            del self.optimizer.found_inf  # never leave a stale flag on the user's optimizer

    def pending(self) -> torch.Tensor | None:
        """The flags not read yet (device mode), to convert together with the log point's metrics."""
        return self._flags[: self._unread] if self.on_device and self._unread else None

    def read(self, flags: list[float]) -> None:
        """Act on flags brought to the host: error, or count the skips and warn."""
        first, count, longest = None, 0, 0
        for i, flag in enumerate(flags, start=self._step + 1):
            if flag:
                first = first or i
                count += 1
                self.consecutive += 1
                longest = max(longest, self.consecutive)
            else:
                self.consecutive = 0
        self._step += len(flags)
        self._unread = 0
        if count:
            self.skipped += count
            self._act(first, float("nan"), "the optimizer skipped that step on the device", count, longest)

    def flush(self) -> None:
        """Read any unread flags now (before a checkpoint is written)."""
        pending = self.pending()
        if pending is not None:
            self.read(pending.tolist())  # note: CPU-GPU sync point, once per checkpoint

    def _act(self, step: int, value: float, what: str, count: int, longest: int) -> None:
        if self.policy == "error":
            raise FloatingPointError(
                f"step {step}: train/loss is {value}; {what}. Lower the learning rate, set clip_grad_norm, "
                "or use on_nonfinite: skip"
            )
        if longest > self.max_consecutive:
            raise FloatingPointError(
                f"step {step}: train/loss was not finite for {longest} steps in a row "
                f"(max_consecutive_skips: {self.max_consecutive}); stopping"
            )
        more = f" ({count} such steps since the last check)" if count > 1 else ""
        warnings.warn(f"step {step}: train/loss is {value}; skipped this optimizer step{more}", stacklevel=3)
