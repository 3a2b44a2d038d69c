"""Device, precision and seeding, each resolved once before the loop starts."""

from __future__ import annotations

import contextlib
import os
import random

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' into a device that exists, or say what does.

    Under torchrun (``local_rank`` given) 'auto' and 'cuda' mean this process's own GPU, cuda:LOCAL_RANK.
    """
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {spec!r} was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); "
                "use device: cpu or device: auto"
            )
        if ":" in spec:
            index = int(spec.split(":", 1)[1])
        else:
            index = local_rank if local_rank is not None else torch.cuda.current_device()
        if index >= count:
            raise ValueError(
                f"device {spec!r} was requested but this machine has {count} CUDA device(s): "
                f"{', '.join(f'cuda:{i}' for i in range(count))}"
            )
        return torch.device("cuda", index)
    raise ValueError(f"device {spec!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


class Precision:
    """The autocast context and the gradient scaler for one precision on one device.

    Built once, so the training step has no branch on the precision: ``autocast`` is a
    ``nullcontext`` for fp32, and ``scaler`` is only enabled for fp16.
    """

    def __init__(self, name: str, device: torch.device):
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision {name!r} is not one of 'fp32', 'bf16', 'fp16'")
        self.name = name
        self.dtype = _DTYPES.get(name, torch.float32)
        if name == "fp32":
            self.autocast = contextlib.nullcontext()
        else:
            self.autocast = torch.autocast(device_type=device.type, dtype=self.dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def __repr__(self) -> str:
        return f"Precision({self.name!r})"


def seed_everything(seed: int) -> None:
    """Seed python, numpy (when installed), torch and every CUDA device."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch already gives each worker ``base_seed + worker_id``;
    derive python's and numpy's seeds from it so every worker differs and repeats run to run."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Turn torch's deterministic algorithms on (or leave them as they are)."""
    if not enabled:
        return
    # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere and newer: the speed users expect from CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
