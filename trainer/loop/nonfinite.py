"""What happens when a step's loss or a gradient is NaN or Inf: ``on_nonfinite: error | skip``.

A skipped step means one thing however it was detected: the weights and the optimizer state are
left as they were, the step still counts (``global_step`` advances and the scheduler steps, so
data and schedule stay aligned), the step's hooks run, and its loss is left out of ``train/loss``.

Two ways to look, chosen once per run (``nonfinite_check: auto | host | device``):

* on the host (``auto`` on CPU, or with an optimizer that is not fused): the step's value is read before
  the optimizer step, so a bad step never reaches the weights. On CPU that costs well under a
  microsecond; on CUDA it would be a sync per step, hence:
* on the device (``auto``: CUDA with a fused optimizer, ``fused=True``, and no fp16 scaler): each step writes
  its "not finite" flag into a small device buffer and hands it to the optimizer as ``found_inf``,
  which makes the fused kernel leave weights and optimizer state untouched for that step. The host
  reads the buffer at the next log point, with the logged metrics, and then errors or warns naming
  the first bad step. No host sync per step.

Once a step has been found non-finite, and only then, ``Diagnosis`` looks at the weights and the
step's batch, so that the message names the cause when they show it (non-finite initial weights,
non-finite inputs) instead of advice about the learning rate.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from trainer.parallel.distributed import is_dtensor

CAPACITY = 4096  # flags kept on the device between two reads


class NonFiniteGuard:
    """``optimizers``: every optimizer of the run (several under ``Trainer.manual_step``); the first
    is the one a check without an ``optimizer`` is for."""

    def __init__(self, policy: str, max_consecutive: int, optimizers: list[torch.optim.Optimizer],
                 device: torch.device, fp16: bool, check: str = "auto"):
        self.policy, self.max_consecutive = policy, max_consecutive
        self.optimizer = optimizers[0]
        self.device = device
        fused = all(group.get("fused") for opt in optimizers for group in opt.param_groups)
        # Fused SGD with momentum leaves its momentum buffers uninitialised (empty_like) when its
        # first step is skipped through found_inf, and later steps read them: not on the device.
        momentum = any(isinstance(opt, torch.optim.SGD) and any(g.get("momentum") for g in opt.param_groups)
                       for opt in optimizers)
        if check == "device" and not (fused and not fp16 and not momentum):
            raise ValueError(
                "nonfinite_check: device needs a fused optimizer (fused=True, which configs choose for "
                "Adam, AdamW and SGD), not SGD with momentum, and no fp16 scaler; use nonfinite_check: auto or host"
            )
        fused = fused and not momentum
        self.on_device = check == "device" or (check == "auto" and device.type == "cuda" and fused and not fp16)
        self.consecutive = 0  # length of the current run of non-finite steps
        self.runs: dict[str, int] = {}  # the same per optimizer, by name (several: manual_step)
        self.skipped = 0  # non-finite steps skipped in the whole run
        self._flags: torch.Tensor | None = None
        self._unread = 0
        self._flag_steps: list[tuple[int, str]] = []  # the step and optimizer of each unread flag (manual_step)
        self._step = 0  # the step the first unread flag belongs to, minus one
        self._taken = 0  # steps taken since the last log point (as far as read)
        self.explain: Callable[[int, bool], str | None] = lambda step, initial: None  # see Diagnosis

    def start(self, step: int, log_every: int, per_step: int = 1) -> None:
        """Before the first step of a ``fit`` (after any resume): no unread flags. ``per_step``:
        the checks one step makes (one per optimizer under ``manual_step``)."""
        self._step, self._unread, self._flag_steps = step, 0, []
        if self.on_device:
            self._flags = torch.zeros(min(log_every * per_step, CAPACITY), device=self.device)

    def check(self, value: torch.Tensor, grads_found: torch.Tensor | None, step: int,
              loss: torch.Tensor | None, optimizer: torch.optim.Optimizer | None = None,
              name: str = "") -> bool | torch.Tensor:
        """Before optimizer step ``step``: is it skipped? It is when ``value`` is not finite or
        ``grads_found`` (a 0/1 flag of non-finite gradients, see ``strategy.step_value``) is 1,
        which is then cleared. On the host, a bool (or an error under ``on_nonfinite: error``); on
        the device, a 0/1 flag tensor that the fused optimizer also reads, so the step skips itself
        without the host waiting. ``optimizer``: the one about to step (default: the run's);
        ``loss`` ``None``: only gradients decide (``manual_step``), and ``name`` says whose."""
        if self.on_device:
            if self._unread == len(self._flags):
                self.read(self.pending().tolist())  # note: CPU-GPU sync point, only if log interval > CAPACITY
            found = self._flags.select(0, self._unread)
            torch.logical_not(torch.isfinite(value), out=found)
            if grads_found is not None:
                torch.maximum(found, grads_found, out=found)
                grads_found.zero_()
            self._unread += 1
            self._flag_steps.append((step, name))
            (optimizer or self.optimizer).found_inf = found  # read by fused optimizers: skip this step on the device
            return found
        # On CPU these are plain reads, nothing to wait for.
        number = value.item()
        if math.isfinite(number) and (grads_found is None or not grads_found.item()):
            self._count(name, False)
            self._taken += 1
            return False
        if grads_found is not None:
            grads_found.zero_()
        self._count(name, True)
        self.skipped += 1
        if loss is None:
            subject = f"a gradient of {name} is not finite"
        else:
            loss_value = loss.item()  # the error path only
            subject = (f"train/loss is {loss_value}" if not math.isfinite(loss_value)
                       else f"a gradient is not finite (train/loss {loss_value:.6g})")
        self._act(step, subject, f"stopped before the optimizer step; the weights are those of step {step - 1}",
                  1, self._run(name))
        return True

    def _count(self, name: str, bad: bool) -> None:
        """One step's verdict into the run of non-finite steps of its optimizer (``""``: the run's one)."""
        if name:
            self.runs[name] = self.runs.get(name, 0) + 1 if bad else 0
        else:
            self.consecutive = self.consecutive + 1 if bad else 0

    def _run(self, name: str) -> int:
        return self.runs.get(name, 0) if name else self.consecutive

    def done(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        if self.on_device:
            del (optimizer or self.optimizer).found_inf  # never leave a stale flag on the user's optimizer

    def pending(self) -> torch.Tensor | None:
        """The flags not read yet (device mode), to convert together with the log point's metrics."""
        return self._flags[: self._unread] if self.on_device and self._unread else None

    def read(self, flags: list[float]) -> None:
        """Act on flags brought to the host: error, or count the skips and warn."""
        first, count, longest = None, 0, 0
        steps = (self._flag_steps if len(self._flag_steps) == len(flags)
                 else [(self._step + 1 + i, "") for i in range(len(flags))])
        for (i, name), flag in zip(steps, flags):
            self._count(name, bool(flag))
            if flag:
                first = first or i
                count += 1
                longest = max(longest, self._run(name))
        self._step += len(flags)
        self._unread, self._flag_steps = 0, []
        self._taken += len(flags) - count
        if count:
            self.skipped += count
            self._act(first, "train/loss or a gradient is not finite", "the optimizer skipped that step on the device",
                      count, longest)

    def took_steps(self) -> bool:
        """At a log point (flags read): whether any step since the previous one was taken."""
        taken, self._taken = self._taken, 0
        return taken > 0

    def flush(self) -> None:
        """Read any unread flags now (before a checkpoint is written)."""
        pending = self.pending()
        if pending is not None:
            self.read(pending.tolist())  # note: CPU-GPU sync point, once per checkpoint

    def state_dict(self) -> dict[str, int]:
        # The steps taken belong to the log interval in progress, which the checkpoint holds too: a
        # resumed run that logs it before taking a step of its own (a stop at the last step) logs its loss.
        state = {"consecutive_skips": self.consecutive, "skipped_steps": self.skipped, "taken_steps": self._taken}
        if self.runs:
            state["consecutive_skips_by_optimizer"] = dict(self.runs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.skipped = state["consecutive_skips"], state["skipped_steps"]
        self._taken = state.get("taken_steps", 0)
        self.runs = dict(state.get("consecutive_skips_by_optimizer") or {})

    def _act(self, step: int, subject: str, what: str, count: int, longest: int) -> None:
        # The weights are still the initial ones when every step before this one was skipped.
        cause = self.explain(step, step - 1 == self.skipped - count)
        if self.policy == "error":
            raise FloatingPointError(
                f"step {step}: {subject}; {what}. " + (cause or "Lower the learning rate, set clip_grad_norm, "
                                                       "or use on_nonfinite: skip")
            )
        if longest > self.max_consecutive:
            raise FloatingPointError(
                f"step {step}: the loss or gradients were not finite for {longest} steps in a row "
                f"(max_consecutive_skips: {self.max_consecutive}); stopping"
            )
        more = f" ({count} such steps since the last check)" if count > 1 else ""
        warnings.warn(f"step {step}: {subject}; skipped this optimizer step{more}" + (f". {cause}" if cause else ""),
                      stacklevel=3)


class Diagnosis:
    """Why step ``step`` was not finite, when the weights or its batch show it: non-finite weights
    (from ``init_from``, the model's initialisation, or an earlier optimizer step) come first, since
    they spoil every batch; then non-finite values in the step's last micro-batch (``last_batch()``
    gives it with the step it belongs to: the log interval keeps it anyway, and the device check
    reads its flags later, when it may be another step's). ``init_from``: the run's ``InitFrom``,
    which says which tensors it loaded."""

    def __init__(self, module: torch.nn.Module, last_batch: Callable[[], tuple[Any, int]], init_from: Any):
        self.module, self.last_batch, self.init_from = module, last_batch, init_from

    def __call__(self, step: int, initial: bool) -> str | None:
        """``initial``: no optimizer step has changed the weights yet."""
        for name, tensor in itertools.chain(self.module.named_parameters(), self.module.named_buffers()):
            bad = _non_finite(tensor)
            if not bad:
                continue
            if initial and name in self.init_from.loaded:
                return (f"The initial weights are not finite: init_from's tensor {self.init_from.loaded[name]} "
                        f"(the model's {name}, from {self.init_from.spec.path}) holds {bad}; load finite weights")
            if initial:
                return (f"The initial weights are not finite: the model's {name} holds {bad} before the first "
                        "step; fix the model's initialisation (or the code that set it)")
            return (f"The weights were not finite before this step: the model's {name} holds {bad}, which an "
                    "earlier optimizer step wrote; lower the learning rate or check the optimizer's settings (eps)")
        batch, batch_step = self.last_batch()
        if batch_step != step:
            return None
        for where, tensor in _tensors(batch, "batch"):
            bad = _non_finite(tensor)
            if bad:
                return (f"Its inputs are not finite: {where} of step {step}'s batch holds {bad}; clean the data "
                        "(drop or repair those samples), or skip such steps with on_nonfinite: skip")
        return None


def _non_finite(tensor: torch.Tensor) -> str:
    """``"3 non-finite values of 512 (nan, inf)"``, or ``""`` when every value is finite."""
    local = tensor.to_local() if is_dtensor(tensor) else tensor  # this rank's part: no collective
    if not (local.is_floating_point() or local.is_complex()):
        return ""
    local = local.detach()
    finite = torch.isfinite(local)
    bad = local.numel() - int(finite.sum())  # note: CPU-GPU sync point, on the error path only
    if not bad:
        return ""
    kinds = [k for k, found in (("nan", torch.isnan(local).any()), ("inf", torch.isinf(local).any())) if found]
    return f"{bad} non-finite value{'s' if bad > 1 else ''} of {local.numel()} ({', '.join(kinds)})"


def _tensors(obj: Any, where: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a batch with where it sits (``batch[0]``, ``batch['x']``)."""
    if isinstance(obj, torch.Tensor):
        return [(where, obj)]
    if isinstance(obj, (tuple, list)):
        return [found for i, item in enumerate(obj) for found in _tensors(item, f"{where}[{i}]")]
    if isinstance(obj, dict):
        return [found for key, item in obj.items() for found in _tensors(item, f"{where}[{key!r}]")]
    return []
