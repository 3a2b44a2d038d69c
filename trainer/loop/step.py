"""One optimizer step, written once: the automatic loop and ``manual_step`` both call it.

For one optimizer, in this order: the fp16 unscale (hooks, the check and clipping see true
gradients); for summed losses the gradients of the mean over every item (``trainer.losses``);
``on_after_backward``; the non-finite decision (``trainer.loop.nonfinite``); clipping;
``on_before_optimizer_step``; the optimizer step, or its skip; its scheduler (a skipped step still
counts, so data and schedule stay aligned); ``on_before_zero_grad``; ``zero_grad``. After the
accumulation window's last optimizer the fp16 scale is updated once (torch's AMP recipe for one or
several optimizers): ``run`` does it after the automatic loop's one step, ``end_window`` after
``manual_step``'s.

Everything that does not change from step to step (which function steps each optimizer, which
parameters it holds, the hooks) is resolved when the step is built, so a step has no branch on
precision, compilation or the number of optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from trainer.config import CompileConfig
from trainer.data.batches import describe
from trainer.loop import compilation
from trainer.loop.nonfinite import NonFiniteGuard
from trainer.losses import SUM, summed


def split_loss(outputs: Any, accum: int, scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``training_step``'s return as ``(loss, what backward gets, item count)``: a mean loss is
    divided by ``accum`` for backward and has no count; a ``loss_sum`` goes back whole, and the step
    divides its gradients by the step's count of items (``OptimizerStep``, ``trainer.losses``).
    ``scale``: fp16's loss scaling, applied to what backward gets."""
    if isinstance(outputs, torch.Tensor):  # the usual return: the mean loss
        loss = outputs
    elif isinstance(outputs, dict) and SUM in outputs:
        loss, count = summed(outputs, "training_step")
        return loss, (loss if scale is None else scale(loss)), count
    elif isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        loss = outputs["loss"]
    else:
        raise TypeError(
            f"training_step must return a loss Tensor, a dict with a 'loss' Tensor, or a dict with "
            f"'loss_sum' and 'count' Tensors, got {describe(outputs)}"
        )
    divided = loss / accum if accum > 1 else loss
    return loss, (divided if scale is None else scale(divided)), None


class OptimizerStep:
    """``run(optimizer, number, loss=None, count=None, name="", last=True)``: one step of ``optimizer``, the
    run's optimizer step ``number``; returns whether it was skipped (a bool, or a 0/1 device flag
    under ``nonfinite_check: device``).

    ``loss``: the step's loss (its non-finiteness skips the step too), or ``None`` when only the
    gradients decide (``manual_step``). ``count``: for summed losses, the step's item count on this
    rank. ``name`` says whose gradients were not finite when several optimizers step.
    ``hooks``: hook name to the functions to call (``trainer.hooks.collect_hooks``), each called
    with ``owner`` first."""

    def __init__(self, owner: Any, hooks: Mapping[str, Sequence[Callable[..., Any]]], strategy: Any,
                 guard: NonFiniteGuard, scaler: torch.amp.GradScaler, optimizers: Sequence[torch.optim.Optimizer],
                 schedulers: Sequence[Any], device: torch.device, clip_grad_norm: float | None = None,
                 compiled: Mapping[int, Callable[[], None]] | None = None):
        self.owner, self.strategy, self.guard = owner, strategy, guard
        self.after_backward = hooks["on_after_backward"]
        self.before_optimizer_step = hooks["on_before_optimizer_step"]
        self.before_zero_grad = hooks["on_before_zero_grad"]
        self.fp16 = fp16 = scaler.is_enabled()
        self.scaler = scaler
        self.check_grads = not fp16  # under fp16 the scaler owns non-finite gradients (it skips and lowers the scale)
        self.clip_grad_norm = clip_grad_norm
        self.clipping = clip_grad_norm is not None
        self.zero = torch.zeros((), device=device)  # the value of a step without a loss: its gradients decide
        compiled = compiled or {}
        self.steppers: dict[int, Callable[[], Any]] = {
            id(opt): compiled.get(id(opt)) or ((lambda opt=opt: scaler.step(opt)) if fp16 else opt.step)
            for opt in optimizers}
        self.schedulers = {id(opt): s for opt, s in zip(optimizers, schedulers)}
        self.params: dict[int, list[torch.Tensor]] = {}
        for opt in optimizers:
            self.set_params(opt, [p for group in opt.param_groups for p in group["params"]])

    @classmethod
    def for_run(cls, owner: Any, hooks: Mapping[str, Sequence[Callable[..., Any]]], strategy: Any,
                guard: NonFiniteGuard, scaler: torch.amp.GradScaler, optimizers: Sequence[torch.optim.Optimizer],
                schedulers: Sequence[Any], device: torch.device, clip_grad_norm: float | None,
                compiled: CompileConfig | None, automatic: bool) -> OptimizerStep:
        """The run's step: with ``compile.optimizer`` the first optimizer's step compiled (fp16 is
        refused by the config: the scaler steps eagerly); ``automatic`` (no ``manual_step``): its
        clipping and non-finite check see every trainable parameter of ``owner``."""
        steppers = {}
        if compiled is not None and compiled.optimizer:
            steppers[id(optimizers[0])] = compilation.compile_step(optimizers[0], compiled, strategy.sharded)
        step = cls(owner, hooks, strategy, guard, scaler, optimizers, schedulers, device, clip_grad_norm, steppers)
        if automatic:
            step.set_params(optimizers[0], owner.trainable_parameters())
        return step

    def set_params(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        """The parameters whose gradients ``optimizer``'s step checks, clips and rescales (the
        automatic loop: every trainable parameter, again after ``unfreeze``)."""
        self.params[id(optimizer)] = params

    def run(self, optimizer: torch.optim.Optimizer, number: int, loss: torch.Tensor | None = None,
            count: torch.Tensor | None = None, name: str = "", last: bool = True) -> bool | torch.Tensor:
        """``last``: the accumulation window ends with this step (``manual_step`` passes ``False``
        and calls ``end_window`` after its window's steps)."""
        # Once per step: the calls below pass their arguments by position (keywords cost more).
        key = id(optimizer)
        owner, params = self.owner, self.params[key]
        if self.fp16:
            self.scaler.unscale_(optimizer)
        if count is not None:
            loss = loss * self.strategy.mean_over_items(params, count)
        for fn in self.after_backward:
            fn(owner)
        value, found, norm = self.strategy.step_value(loss if loss is not None else self.zero, params,
                                                      self.check_grads, self.clipping)
        skipped = self.guard.check(value, found, number, loss, optimizer, name)  # may raise
        if self.clipping:
            self.strategy.clip(params, self.clip_grad_norm, norm)
        for fn in self.before_optimizer_step:
            fn(owner, optimizer)
        if skipped is not True:
            self.steppers[key]()  # with a device-side flag, a bad step skips itself here
        scheduler = self.schedulers[key]
        if scheduler is not None:
            scheduler.step()
        for fn in self.before_zero_grad:
            fn(owner, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if skipped is not False:  # a device-side flag, or a skipped step: the guard clears what it set
            self.guard.done(optimizer)
        if last and self.fp16:
            self.scaler.update()
        return skipped

    def end_window(self) -> None:
        """After the accumulation window's last optimizer step: the fp16 scale, updated once."""
        if self.fp16:
            self.scaler.update()


__all__ = ["OptimizerStep", "split_loss"]
