"""``compile:``: the model through ``torch.compile`` with the run's settings, optionally the optimizer
step too, and the count of recompilations that the log records carry.

A compiled function keeps one graph per set of guards it was traced under (shapes, dtypes,
train/eval mode, Python values it read). A call that fails every guard compiles again: shapes that
keep changing (a varying sequence length under ``dynamic: false``) or a value that changes every step
(a learning rate read as a float) make every step pay a compilation, until Dynamo gives up at its
recompile limit and runs the function eagerly. ``compile/recompiles`` in the log records shows it.
"""

from __future__ import annotations

import difflib
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer.config import CompileConfig


def compile_model(model: nn.Module, settings: CompileConfig | None) -> nn.Module:
    """``model`` compiled with ``settings`` (``None``: ``model`` itself)."""
    if settings is None:
        return model
    check_backend(settings.backend)
    return torch.compile(model, mode=settings.mode, fullgraph=settings.fullgraph, dynamic=settings.dynamic,
                         backend=settings.backend)


def check_backend(backend: str) -> None:
    """An unknown backend is refused here, not at the first step (torch.compile checks it only then)."""
    from torch._dynamo import list_backends  # half a second to import: only runs that compile pay it

    known = list_backends(exclude_tags=())
    if backend not in known:
        close = difflib.get_close_matches(backend, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"compile backend {backend!r} is not one torch.compile knows; {hint}"
                         f"the usual ones: {', '.join(sorted(list_backends()))}")


def check_optimizer(optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    """Refuse an optimizer whose step ``compile: {optimizer: true}`` cannot compile, saying what to use."""
    if any(group.get("fused") for group in optimizer.param_groups):
        raise ValueError(
            f"compile: {{optimizer: true}} with a fused {type(optimizer).__name__}: torch.compile does not trace "
            "into fused kernels, so nothing would be compiled; build the optimizer with fused=False (configs do "
            "when optimizer: true is set and the optimizer section does not choose fused), or compile the model only"
        )
    if sharded:
        raise ValueError(
            "compile: {optimizer: true} is not supported with strategy: fsdp (the optimizer steps sharded "
            "parameters); compile the model only, or use strategy: ddp"
        )


def compile_step(optimizer: torch.optim.Optimizer, settings: CompileConfig, sharded: bool = False) -> Callable[[], None]:
    """The optimizer's step, compiled (PyTorch's "compiling the optimizer" recipe): the optimizer's own
    code traced into one generated kernel.

    The learning rate goes in as a 0-d tensor for the call: a float is a constant of the traced
    graph, and a schedule that changes it every step would recompile every step. Outside the call
    each group's ``lr`` stays the float it was, for schedulers, logs and checkpoints. The step is
    looked up at each call, so a scheduler's wrapper around it (built later) still sees it called.
    """
    check_optimizer(optimizer, sharded)
    tensors: dict[int, torch.Tensor] = {}  # one per parameter group, kept: the graph's guards see the same one

    def call_step() -> None:
        optimizer.step()

    compiled = torch.compile(call_step, mode=settings.mode, backend=settings.backend)

    def step() -> None:
        groups = optimizer.param_groups
        floats = [group["lr"] for group in groups]
        for group, lr in zip(groups, floats):
            if isinstance(lr, torch.Tensor):
                continue  # built with a tensor learning rate, as the recipe has it: nothing to do
            tensor = tensors.get(id(group))
            if tensor is None:
                # float32 on the CPU, as in PyTorch's recipe (Dynamo's guards read a float64 scalar's
                # value on every call)
                tensor = tensors[id(group)] = torch.tensor(float(lr))
            tensor.fill_(lr)  # a CPU scalar: no device work, no sync
            group["lr"] = tensor
        try:
            compiled()
        finally:
            for group, lr in zip(groups, floats):
                group["lr"] = lr

    return step


class Recompiles:
    """Compilations in this process since ``start()``: Dynamo's count of frames it was asked to
    compile, read at log points only (a Python counter; no device work). After the first step a
    few are normal (validation's eval mode, a last batch of another size); a count that keeps
    rising means every step recompiles. ``TORCH_LOGS=recompiles`` prints why."""

    def __init__(self) -> None:
        self._base = self._last = 0

    def start(self) -> None:
        self._base = self._last = _frames()

    def count(self) -> int:
        now = _frames()
        if now < self._last:  # torch._dynamo.reset() cleared the counters: count on from there
            self._base -= self._last
        self._last = now
        return now - self._base


def _frames() -> int:
    from torch._dynamo.utils import counters  # as check_backend: only runs that compile import it

    return counters["frames"]["total"]


def forget(compiled: Any) -> None:
    """After a wrapper (DDP's) is dropped: compiled code and its guards hold it too, through
    reference cycles, so with ``compile`` they are cleared and collected."""
    if compiled:
        import torch._dynamo  # paid only by runs that compile

        torch._dynamo.reset()
        gc.collect()

