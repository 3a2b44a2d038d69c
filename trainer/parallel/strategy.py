"""One process, DDP or FSDP2, chosen once: everything the loop does differently under each.

The Trainer asks its strategy to wrap the model, to keep gradients local on the micro-batches
before a step, for the value whose finiteness decides a step, for state dicts, to evaluate in
lockstep, and to close; it never asks which strategy it is running under.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from trainer.data.sources import length_of
from trainer.parallel import distributed

# torch.distributed.fsdp and .checkpoint are imported inside the methods of FSDP that use them: a
# process that shards nothing does not load them for this module.


class SingleProcess:
    """One process (outside torchrun, or torchrun with one rank): the model as it is."""

    sharded = False  # parameters are whole on every rank (checkpoints are files)

    def __init__(self, layout: distributed.Layout, device: torch.device):
        self.layout, self.device = layout, device
        self._found = torch.zeros((), device=device)  # set by the fused finiteness check below
        self._one = torch.ones((), device=device)
        self.joined_group = False  # join() joined torchrun's process group: close() leaves it
        self.closed = False

    def join(self) -> None:
        """Join torchrun's process group (NCCL on CUDA, gloo on CPU) unless the script already did."""
        self.joined_group = distributed.init(self.layout, self.device)

    def wrap(self, module: nn.Module, optimizer: Any) -> nn.Module:
        """What training steps call. ``optimizer`` (built before wrapping, or ``None``) is adjusted
        where the wrapper replaces parameters."""
        return module

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer that cannot step this strategy's parameters, saying what to use."""

    def no_sync(self) -> Callable[[], contextlib.AbstractContextManager] | None:
        """A context for the micro-batches before a step that keeps gradients local, or ``None``."""
        return None

    def step_value(self, step_loss: torch.Tensor, params: list[torch.Tensor], grads_too: bool,
                   need_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What decides whether a step is taken: ``(value, found, norm)``, the step is bad when
        ``value`` is not finite or ``found`` (if given) is 1; ``norm`` is the total gradient norm when
        ``need_norm`` (clipping) asks for it. Alone: the step's loss, and with ``grads_too`` the
        gradients too: when clipping computes their norm anyway, loss + norm (finite only if both
        are); otherwise GradScaler's fused check, one kernel over all gradients that sets ``found``
        (and never clears it: the non-finite guard does, after a bad step)."""
        if not grads_too:
            return step_loss, None, None
        if need_norm:
            norm = _grad_norm(params, self.device)
            return step_loss + norm, None, norm
        grads = present_grads(params)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found, self._one)
        return step_loss, self._found, None

    def mean_over_items(self, params: list[torch.Tensor], count: torch.Tensor) -> torch.Tensor:
        """Turn the gradients of summed losses (``trainer.losses``) into those of the mean over every
        item of the step on every rank, and return the factor they were multiplied by.

        ``count`` (this rank's items, a float64 scalar on the device) is summed over the ranks in
        place: one scalar all-reduce, no host sync. DDP and FSDP have already averaged the gradients
        over the ranks, so the factor is world size / total, applied by one foreach kernel (sharded
        DTensor gradients included). A total of 0 counts as 1: the gradient of no items stays zero."""
        total = distributed.all_sum(count)
        factor = (self.layout.world_size / torch.where(total > 0, total, 1.0)).float()
        grads = present_grads(params)
        if grads:
            torch._foreach_mul_(grads, factor)
        return factor

    def clip(self, params: list[torch.Tensor], max_norm: float, norm: torch.Tensor | None) -> None:
        if norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return module.state_dict(), optimizer.state_dict()

    def eval_module(self, model: nn.Module, module: nn.Module) -> nn.Module:
        """What evaluation calls (``model`` is what training steps call)."""
        return model

    def end_evaluation(self, module: nn.Module) -> None:
        """After forwards without a backward (evaluation, the sanity pass's validation batch)."""

    def eval_batches(self, source: Any) -> Iterator[tuple[Any, bool]]:
        """``(batch, counted)`` pairs of one pass over ``source``."""
        for batch in source.epoch(0, 0):
            yield batch, True

    def unwrap(self) -> bool:
        """Drop a wrapper that holds the process group; True if there was one."""
        return False

    def close(self) -> None:
        """Leave the process group ``join`` joined, once, after ``unwrap`` and after everything else
        that holds the group is dropped (``distributed.shutdown``); then the strategy is closed."""
        if self.joined_group and not self.closed:
            distributed.shutdown()
        self.closed = True


class DDP(SingleProcess):
    """``DistributedDataParallel``: a whole model per rank, gradients all-reduced in backward."""

    def __init__(self, layout: distributed.Layout, device: torch.device):
        super().__init__(layout, device)
        self.ddp: nn.parallel.DistributedDataParallel | None = None

    def wrap(self, module: nn.Module, optimizer: Any) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return self.ddp

    def no_sync(self):
        return self.ddp.no_sync if self.ddp is not None else None

    def step_value(self, step_loss, params, grads_too, need_norm):
        # The ranks' losses differ, but their all-reduced gradients agree (and a non-finite loss on
        # any rank makes them non-finite): checking the gradient norm makes every rank take the same
        # decision without a collective.
        norm = _grad_norm(params, self.device)
        return norm, None, norm

    def eval_module(self, model: nn.Module, module: nn.Module) -> nn.Module:
        # DDP's forward would synchronise buffers across ranks; evaluation runs on the plain module.
        return module

    def unwrap(self) -> bool:
        """Drop the DDP wrapper before the process group is destroyed.

        Its C++ reducer holds the group, and a group destroyed from there (the GIL held) can deadlock
        with a gloo thread still freeing the last collective's tensors, which needs the GIL: the
        process then never exits. Dropped while torch's registry still holds the group, the wrapper
        frees nothing; ``distributed.shutdown`` then meets the other ranks and destroys the group
        from the registry, which releases the GIL."""
        held, self.ddp = self.ddp is not None, None
        return held


class FSDP(SingleProcess):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the ranks."""

    sharded = True

    def __init__(self, layout: distributed.Layout, device: torch.device, shard: Callable[[nn.Module], None]):
        super().__init__(layout, device)
        self.shard = shard
        self.module: nn.Module | None = None

    def end_evaluation(self, module: nn.Module) -> None:
        # FSDP keeps the root unit's parameters gathered after its forward, for the backward that
        # follows in training; after evaluation none follows, and the module would hold unsharded
        # parameters, not the ones the optimizer steps, until the next training forward.
        from torch.distributed.fsdp import FSDPModule

        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()

    def wrap(self, module: nn.Module, optimizer: Any) -> nn.Module:
        # fully_shard replaces each parameter with a sharded one; an optimizer built from the
        # model's parameters beforehand is pointed at the replacements by name.
        names = {id(p): n for n, p in module.named_parameters()}
        self.shard(module)
        if isinstance(optimizer, torch.optim.Optimizer):
            distributed.remap_optimizer(optimizer, names, module)
        self.module = module
        return module

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, torch.optim.SGD) and any(g.get("fused") for g in optimizer.param_groups):
            raise ValueError(
                "fused SGD has no kernel for sharded parameters; under strategy: fsdp build SGD with "
                "foreach=True (the default a config gets) or use fused Adam/AdamW"
            )

    def no_sync(self):
        return lambda: distributed.fsdp_no_sync(self.module)

    def step_value(self, step_loss, params, grads_too, need_norm):
        norm = _grad_norm(params, self.device)  # each rank holds a shard: one scalar all-reduce
        return norm, None, norm

    def clip(self, params: list[torch.Tensor], max_norm: float, norm: torch.Tensor | None) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)  # DTensor gradients: torch's own path

    def state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(module, optimizer)

    def eval_batches(self, source: Any) -> Iterator[tuple[Any, bool]]:
        """Every forward gathers parameters from all ranks, so every rank must run as many as the
        others: a rank whose (unpadded) share has run out repeats its last batch without counting it."""
        return lockstep(source, self.device, repeat_last=True, no_batch=lambda: ValueError(
            f"rank {self.layout.rank} has no validation batch: under strategy: fsdp every rank needs at least one "
            "(there are fewer validation samples than ranks)"))


def lockstep(source: Any, device: torch.device, repeat_last: bool,
             no_batch: Callable[[], Exception]) -> Iterator[tuple[Any, bool]]:
    """``(batch, counted)`` pairs of one pass over ``source``, as many on every rank as on the rank
    with the most: a rank whose share has run out yields ``(None, False)``, or with ``repeat_last``
    (under FSDP, where every forward gathers from all ranks) its last batch again, uncounted; a rank
    with no batch to repeat raises ``no_batch()``. One collective, or one per batch for a source of
    unknown length."""
    length = length_of(source)
    rounds = distributed.all_max(length, device) if length is not None else None  # None: agreed batch by batch
    batches = iter(source.epoch(0, 0))
    last, done = None, 0
    while rounds is None or done < rounds:
        batch = next(batches, None)
        if rounds is None and not distributed.all_max(int(batch is not None), device):
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif repeat_last and last is None:
            raise no_batch()
        else:
            yield (last if repeat_last else None), False
        done += 1


def present_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients that exist (a parameter the backward did not reach has none), reading each
    ``.grad`` once: a read costs about as much as a small tensor op."""
    return [g for p in params if (g := p.grad) is not None]


def _grad_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    grads = present_grads(params)
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(distributed.norms(grads))


def choose(name: str, layout: distributed.Layout, device: torch.device,
           shard: Callable[[nn.Module], None]) -> SingleProcess:
    """``strategy:`` of the config under this launch: one process trains the model as it is."""
    if not layout.enabled:
        return SingleProcess(layout, device)
    return FSDP(layout, device, shard) if name == "fsdp" else DDP(layout, device)
