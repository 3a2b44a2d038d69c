"""Running under ``torchrun`` (or ``srun`` alone, ``trainer.parallel.slurm``): the rank layout from
the environment, the process group, the few collectives the loop needs (at log points, evaluations
and checkpoints; per step only a scalar or two: the gradient norm of sharded parameters, the item
count of summed losses), and FSDP2 sharding (``strategy: fsdp``).

Outside torchrun every function here is a no-op and nothing changes.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.parallel import slurm


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> Layout:
    """The layout torchrun announces in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. A task that srun
    started without torchrun gets those variables (and the rendezvous's) from SLURM's first, so that
    the process group is joined as under torchrun."""
    os.environ.update(slurm.as_torchrun(os.environ))
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({exc})") from None
    return Layout(rank, world, local)


def init(layout: Layout, device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo on CPU) unless the script already did; True if joined here."""
    if not layout.enabled:
        return False
    if not _collecting_at_exit:
        _collect_at_exit()
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A rank that dies leaves the others waiting in a collective; torchrun then stops them, and
    # this timeout bounds the wait where nothing else does.
    timeout = datetime.timedelta(seconds=float(os.environ.get("TRAINER_DIST_TIMEOUT", "600")))
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return True


_collecting_at_exit = False


def _collect_at_exit() -> None:
    """Under torchrun, what a finished run left unreachable (a Trainer, an FSDP module and the work
    objects of collectives it keeps) is freed at exit while the interpreter is whole: freed during
    interpreter shutdown, a tensor that gloo's work still holds needs the GIL there, and the rank
    aborts ("terminate called without an active exception")."""
    global _collecting_at_exit
    atexit.register(gc.collect)
    _collecting_at_exit = True


def shutdown() -> None:
    """Leave the process group after a run that ended normally on every rank.

    Nothing outside torch's own registry may hold the group by then (see ``Trainer.close``): the
    registry's reference releases the GIL while the group is destroyed, and gloo's threads need it
    to free the last collective's tensors.
    """
    if dist.is_initialized():
        # Tearing the group down while a peer is mid-collective aborts the process ("terminate
        # called without an active exception"). Meeting first makes every rank idle.
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (gloo has no AVG; callers divide)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Logged values averaged over ranks: one collective per log point, none per step."""
    world = world_size()
    return all_sum(values) / world if world > 1 else values


def all_max(value: int, device: torch.device) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if active():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (the same length on all ranks), in rank order."""
    if not active():
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order; ``None`` on the other ranks. Pickled: for what
    is made at most once per batch outside training (predictions)."""
    if not active():
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order: one object gather, at checkpoints,
    at evaluations and at a stream's first batch only."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ----------------------------------------------------------------------------- FSDP2


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP, or its gradient), asked without
    importing ``torch.distributed.tensor`` (half a second): no DTensor exists before it is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor, as one 1-D tensor on the device; in fp32 for bf16 or fp16 tensors
    (bf16-true), whose own dtype would round it. Sharded tensors contribute their local shards'
    squares, summed over ranks in one all-reduce; no host sync either way."""
    if not tensors:
        return torch.zeros(0)
    dtype = torch.float32 if tensors[0].itemsize < 4 else None
    if not any(is_dtensor(t) for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, dtype=dtype))
    squares = torch.stack(torch._foreach_norm([local(t) for t in tensors], dtype=dtype)).double().square()
    return all_sum(squares).sqrt().float()


def shard_model(module: nn.Module, precision: str = "fp32") -> None:
    """FSDP2's usual plan: every block of every ``nn.ModuleList`` becomes its own unit (its parameters
    are gathered just before it runs and freed after), then the root takes the rest. Parameters
    shared between the root's modules (tied embeddings) stay together in the root unit. With
    ``precision: bf16`` parameters are gathered in bf16 and gradients reduced in fp32; with
    ``bf16-true`` the parameters are bf16 already, and are sharded, gathered and reduced in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # with DTensor: only runs that shard

    kwargs = {}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)


def remap_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], module: nn.Module) -> None:
    """Point an optimizer built before sharding at the sharded parameters that replaced its own.

    ``names`` maps ``id(parameter)`` to its name, taken before ``fully_shard``."""
    if optimizer.state:
        raise ValueError(
            "the optimizer already holds state (it has stepped) before the model was sharded; "
            "build it before training, or return it from configure_optimizers()"
        )
    current = dict(module.named_parameters(remove_duplicate=False))
    for group in optimizer.param_groups:
        remapped = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model; "
                    "under strategy: fsdp every optimized parameter must belong to the model"
                )
            remapped.append(current[name])
        group["params"] = remapped


@contextlib.contextmanager
def fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's ``no_sync``: keep gradients local (no reduce-scatter) inside."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
