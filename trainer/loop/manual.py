"""Several optimizers, and a training step of a subclass's own (``Trainer.manual_step``).

A GAN, an actor-critic or an alternating distillation needs to decide which loss goes back into
which parameters and which optimizer steps when. The subclass overrides one method,
``manual_step(batch)``, called once per micro-batch, and calls two helpers from it:

* ``manual_backward(loss, optimizer=None)``: backward of ``loss`` divided by ``grad_accum_steps``
  (and scaled under fp16), into the parameters ``optimizer`` holds when one is given (a
  generator's loss then leaves the discriminator's gradients alone, through autograd's
  ``inputs=``), else into every parameter the loss reaches;
* ``optimizer_step(optimizer)``: on the last micro-batch of the accumulation window, everything
  the automatic loop does for its one optimizer: gradients averaged over the ranks, the fp16
  unscale, ``on_after_backward``, the non-finite check, clipping, ``on_before_optimizer_step``,
  the step (or its skip), that optimizer's scheduler, ``on_before_zero_grad`` and ``zero_grad``.
  On the micro-batches before, it only notes the request: the gradients keep accumulating.

``global_step`` counts calls of the window (one per ``grad_accum_steps`` micro-batches), not
optimizer steps: a window that steps two optimizers is still one step. One GradScaler serves
every optimizer and updates once per window (torch's AMP recipe for several optimizers).

Under DDP the manual path runs the plain module, never the DDP wrapper (whose reducer allows one
backward per forward and expects every parameter in it): each optimizer's gradients are averaged
over the ranks at its step, in one collective, so the micro-batches before a step never
communicate. FSDP is refused: its gradients are reduced inside backward, by the wrapper.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.device import Precision
from trainer.loop.step import OptimizerStep


class GivenOverConfigured(UserWarning):
    """An optimizer (or scheduler) was given to a Trainer whose subclass overrides
    ``configure_optimizers()``: the one given is used, and what the override builds is not."""


def resolve_optimizers(optimizer: Any, scheduler: Any, configure: Callable[[], Any],
                       params: Callable[[], list[nn.Parameter]],
                       overridden: str | None = None) -> tuple[list[Any], list[Any]]:
    """The run's optimizers and their schedulers (``None`` where one has none), as two lists of
    one length, from what ``Trainer(optimizer=, scheduler=)`` or ``configure_optimizers()`` gave:
    an optimizer or a function of the parameters; ``(optimizer, scheduler)``; a list of
    optimizers; or ``([optimizers], [schedulers])``. A scheduler may be a function of its optimizer.
    ``overridden``: the subclass's ``configure_optimizers`` by name, when it has one; what was given
    wins over it, and a warning says so (a silent choice cost a user a run at the wrong rate)."""
    if optimizer is not None and overridden:
        warnings.warn(GivenOverConfigured(
            f"{overridden}() is not called: the optimizer given as Trainer(optimizer=...) is used; leave optimizer "
            f"out to train with {overridden}()"), stacklevel=3)
    if optimizer is not None and not isinstance(optimizer, (torch.optim.Optimizer, list, tuple)) and callable(optimizer):
        optimizer = optimizer(params())  # a factory: built on the final parameters
    where = "Trainer(optimizer=...)"
    if optimizer is None:
        configured = configure()
        where = "configure_optimizers()"
        if isinstance(configured, tuple) and len(configured) == 2 and not isinstance(configured[1], torch.optim.Optimizer):
            optimizer, returned = configured
            if scheduler is not None and returned is not None:
                warnings.warn(GivenOverConfigured(
                    f"the scheduler {overridden or 'configure_optimizers'}() returned is not used: the one given as "
                    "Trainer(scheduler=...) is; leave scheduler out to use the one it returns"), stacklevel=3)
            scheduler = scheduler if scheduler is not None else returned
        else:
            optimizer = configured
    several = isinstance(optimizer, (list, tuple))
    optimizers = list(optimizer) if several else [optimizer]
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, torch.optim.Optimizer):
            shown = f"item {i} of the list is a {type(opt).__name__}" if several else f"got {type(opt).__name__}"
            raise TypeError(
                f"{where} must give a torch.optim.Optimizer, a list of them, or an (optimizer, scheduler) "
                f"tuple (([optimizers], [schedulers]) for several); {shown}"
            )
    if not optimizers:
        raise ValueError(f"{where} gave an empty list of optimizers; give at least one")
    if several or isinstance(scheduler, (list, tuple)):
        schedulers = list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler] * (scheduler is not None)
        if schedulers and len(schedulers) != len(optimizers):
            raise ValueError(
                f"{where} gave {len(optimizers)} optimizer(s) and {len(schedulers)} scheduler(s); give one "
                "scheduler per optimizer, in the same order, with None for an optimizer without one"
            )
        schedulers = schedulers or [None] * len(optimizers)
    else:
        schedulers = [scheduler]
    # A function of the optimizer (what a config's scheduler section builds) is called with its own.
    schedulers = [s(opt) if callable(s) and not hasattr(s, "step") else s for s, opt in zip(schedulers, optimizers)]
    return optimizers, schedulers


def check_optimizers(optimizers: list[torch.optim.Optimizer], module: nn.Module, strategy: Any,
                     steps_itself: bool) -> None:
    """Several optimizers need a step of the subclass's own, each holding its own parameters; and
    each optimizer must suit the strategy."""
    if len(optimizers) > 1 and not steps_itself:
        raise ValueError(
            f"{len(optimizers)} optimizers were given, and the automatic training step steps one: override "
            "manual_step(batch) in your Trainer subclass to back each loss into its optimizer's parameters and "
            "step it (docs/loop.md), or give one optimizer with several parameter groups"
        )
    check_disjoint(optimizers, module)
    for opt in optimizers:
        strategy.check_optimizer(opt)


def check_disjoint(optimizers: list[torch.optim.Optimizer], module: nn.Module) -> None:
    """Two optimizers that hold one parameter would both step it, each with its own state: refused."""
    owner: dict[int, int] = {}
    names = {id(p): n for n, p in module.named_parameters()}
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                j = owner.setdefault(id(p), i)
                if j != i:
                    raise ValueError(
                        f"optimizers {j} and {i} both hold the parameter {names.get(id(p), tuple(p.shape))!r}; "
                        "give each parameter to one optimizer (e.g. model.generator.parameters() and "
                        "model.discriminator.parameters())"
                    )


def refuse_sharded(strategy: Any) -> None:
    if strategy.sharded:
        raise ValueError(
            "manual_step under strategy: fsdp: FSDP reduces gradients inside backward through its "
            "wrapper, which a step of your own bypasses; use strategy: ddp (or one process)"
        )


def steps(manual: ManualSteps | None, helper: str, owner: Any) -> ManualSteps:
    """The Trainer's ``ManualSteps`` for ``manual_backward`` and ``optimizer_step`` (``helper``), or an
    error saying where they belong when ``owner``'s class steps automatically."""
    if manual is None:
        raise RuntimeError(
            f"{helper}() belongs in manual_step(batch): this {type(owner).__name__} does not override manual_step, "
            "so the automatic step backs and steps; override manual_step instead of training_step to call it"
        )
    return manual


class ManualSteps:
    """The state of ``manual_step``'s accumulation window and what its two helpers do. ``owner``:
    the Trainer whose ``manual_step`` runs and whom the hooks receive; ``step``: the run's
    ``OptimizerStep``; ``accum``: the micro-batches of a window (read at each backward: a resume on
    another number of ranks may have changed it)."""

    def __init__(self, owner: Any, step: OptimizerStep, optimizers: list[torch.optim.Optimizer],
                 hooks: Mapping[str, Sequence[Callable[..., Any]]], precision: Precision, world_size: int,
                 accum: Callable[[], int]):
        self.owner, self.optimizer_step = owner, step
        self.before_backward = hooks["on_before_backward"]
        self.autocast = precision.autocast
        self.scaler = precision.scaler
        self.fp16 = self.scaler.is_enabled()
        self.world = world_size
        self.accum = accum
        self.index = {id(opt): i for i, opt in enumerate(optimizers)}
        self.number = 0  # the optimizer step the window makes
        self.stepping = False  # the current micro-batch ends the window
        self.stepped: set[int] = set()  # the optimizers (their ids) stepped in the window
        self.requested: list[torch.optim.Optimizer] = []  # asked for before the window's last micro-batch
        self.dry = False  # the sanity pass: backward only, nothing steps, no hook fires

    def micro_batch(self, batch: Any, step_now: bool, number: int) -> Any:
        """Run ``manual_step`` on one micro-batch of the window of optimizer step ``number``;
        ``step_now``: it is the window's last."""
        self.stepping, self.number = step_now, number
        with self.autocast:
            outputs = self.owner.manual_step(batch)
        if outputs is not None and not isinstance(outputs, dict):
            raise TypeError(
                f"manual_step must return None or a dict of values to log (e.g. {{'d_loss': d_loss}}), got "
                f"{type(outputs).__name__}; log through self.log(name, value) or return a dict"
            )
        for name, value in (outputs or {}).items():
            if not isinstance(value, (torch.Tensor, int, float)):
                raise TypeError(
                    f"manual_step returned {name!r}: {type(value).__name__}; each value of its dict is logged as "
                    f"train/{name} and must be a tensor or a number"
                )
        return outputs

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shown = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"manual_backward(loss) needs a scalar loss tensor, got {shown}; reduce it (loss.mean())")
        inputs = self._params_of(optimizer, "manual_backward") if optimizer is not None else None
        if self.dry:
            torch.autograd.backward(loss, inputs=inputs)
            return
        for fn in self.before_backward:
            fn(self.owner, loss)
        accum = self.accum()
        divided = loss / accum if accum > 1 else loss
        torch.autograd.backward(self.scaler.scale(divided) if self.fp16 else divided, inputs=inputs)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step ``optimizer`` if this micro-batch ends the window; True when it did."""
        self._params_of(optimizer, "optimizer_step")
        if self.dry:
            return False
        if not self.stepping:
            if optimizer not in self.requested:
                self.requested.append(optimizer)
            return False
        if self.fp16 and id(optimizer) in self.stepped:
            # The scaler unscales an optimizer once between its updates, and updates once per window.
            raise RuntimeError(
                f"manual_step stepped optimizer {self.index[id(optimizer)]} ({type(optimizer).__name__}) twice in "
                f"optimizer step {self.number} under precision: fp16, whose one GradScaler update "
                "per window allows one step per optimizer: step it once per manual_step, or use bf16"
            )
        self._step(optimizer)
        return True

    def end_window(self) -> None:
        """After the window's last micro-batch: the steps asked for on the window's earlier
        micro-batches and not again on its last (one that alternates, or the last, partial window
        of data of unknown length) are taken now; then the fp16 scale is updated, once."""
        for optimizer in self.requested:
            if id(optimizer) not in self.stepped:
                self._step(optimizer)
        self.requested.clear()
        self.stepping = False
        if not self.stepped:
            raise RuntimeError(
                f"manual_step ended optimizer step {self.number} without stepping an optimizer: call "
                "self.optimizer_step(optimizer) for each optimizer that should step, after manual_backward(loss) "
                "(on the micro-batches before the window's last it only notes the request)"
            )
        self.stepped.clear()
        self.optimizer_step.end_window()

    def _params_of(self, optimizer: Any, where: str) -> list[torch.Tensor]:
        if id(optimizer) not in self.index:
            raise ValueError(
                f"{where}: the {type(optimizer).__name__} given is not one of this Trainer's optimizers; pass one "
                "of self.optimizers (what configure_optimizers() returned, after the Trainer built it)"
            )
        return self.optimizer_step.params[id(optimizer)]

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.world > 1:
            _average_over_ranks(self.optimizer_step.params[id(optimizer)], self.world)
        self.optimizer_step.run(optimizer, self.number,
                                name=f"optimizer {self.index[id(optimizer)]} ({type(optimizer).__name__})", last=False)
        self.stepped.add(id(optimizer))


def _average_over_ranks(params: list[torch.Tensor], world: int) -> None:
    """Every rank's gradients of ``params`` replaced by their mean over the ranks: one all-reduce of
    one flat buffer. A parameter this rank's backward did not reach counts as a zero gradient, so
    that every rank sends the same layout."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


__all__ = ["GivenOverConfigured", "ManualSteps", "check_disjoint", "check_optimizers", "refuse_sharded", "resolve_optimizers"]
