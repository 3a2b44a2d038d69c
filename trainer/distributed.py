"""Running under ``torchrun``: the rank layout from the environment, the process group, and the
few collectives the loop needs (at log points, evaluations and checkpoints only, never per step).

Outside torchrun every function here is a no-op and nothing changes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> Layout:
    """The layout torchrun announces in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({exc})") from None
    return Layout(rank, world, local)


def init(layout: Layout, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) unless the script already did."""
    if not layout.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A rank that dies leaves the others waiting in a collective; torchrun then stops them, and
    # this timeout bounds the wait where nothing else does.
    timeout = datetime.timedelta(seconds=float(os.environ.get("TRAINER_DIST_TIMEOUT", "600")))
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (gloo has no AVG; callers divide)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


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
