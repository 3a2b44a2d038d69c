"""Device, precision and seeding, each resolved once before the loop starts."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional: nothing of it to seed
    np = None

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-true")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-true": torch.bfloat16}


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
    """How one precision runs on one device, resolved once so the training step has no branch on it.

    ``autocast`` is the context steps run in: a ``nullcontext`` for fp32, autocast for bf16 and
    fp16, and for bf16-true torch's default dtype set to bf16 (no autocast: the weights are bf16
    already, and a tensor a step makes without a dtype is bf16 like them, as Lightning's
    ``bf16-true`` does). ``scaler`` is only enabled for fp16. ``param_dtype`` is what bf16-true
    converts the model to, and the floating-point tensors of every batch (``None``: left as they are).
    """

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ValueError(f"precision {name!r} is not one of {', '.join(map(repr, PRECISIONS))}")
        self.name = name
        self.dtype = _DTYPES.get(name, torch.float32)
        self.param_dtype = torch.bfloat16 if name == "bf16-true" else None
        if name == "fp32":
            self.autocast = contextlib.nullcontext()
        elif name == "bf16-true":
            self.autocast = DefaultDtype(torch.bfloat16)
        else:
            self.autocast = torch.autocast(device_type=device.type, dtype=self.dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
        self.scale = self.scaler.scale if name == "fp16" else None  # fp16: what backward gets is the scaled loss

    def __repr__(self) -> str:
        return f"Precision({self.name!r})"


class DefaultDtype:
    """Inside, ``dtype`` is torch's default floating-point dtype (what ``torch.zeros(n)`` makes);
    on exit the one before is back, also on an error. Reusable and re-entrant, like autocast."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._saved: list[torch.dtype] = []

    def __enter__(self) -> None:
        self._saved.append(torch.get_default_dtype())
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self._saved.pop())


def model_init(precision: str) -> contextlib.AbstractContextManager:
    """The context a model is built in: under bf16-true its weights are made in bf16 from the
    start (no fp32 copy first, as Lightning's ``init_module``); otherwise nothing changes."""
    return DefaultDtype(torch.bfloat16) if precision == "bf16-true" else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed python, numpy (when installed), torch and every CUDA device."""
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch already gives each worker ``base_seed + worker_id``;
    derive python's and numpy's seeds from it so every worker differs and repeats run to run."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    if np is not None:
        np.random.seed(seed)


@contextlib.contextmanager
def torch_settings(device: torch.device, deterministic: bool):
    """Torch's process-wide switches for a run, each put back as it was on exit (also on an error):
    TF32 matmuls and convolutions on CUDA (the speed users expect from Ampere and newer) and, with
    ``deterministic``, torch's deterministic algorithms with ``cudnn.benchmark`` off. What a run
    does not change it does not touch (a CPU run leaves the precision settings alone)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    added_env = deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    precision = _tf32_get() if device.type == "cuda" else None
    try:
        if precision is not None:
            _tf32_set(_TF32_ON)
        if deterministic:
            # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        if added_env:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if precision is not None:
            _tf32_set(precision)


# TF32 through torch's per-backend settings where torch has them (2.9 and later): reading the legacy
# global setting after a user chose per-backend ones is an error there.
_PER_BACKEND = hasattr(torch.backends.cuda.matmul, "fp32_precision")
_TF32_ON = ("tf32", "tf32") if _PER_BACKEND else (True, True)


def _tf32_get() -> tuple:
    if _PER_BACKEND:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _tf32_set(values: tuple) -> None:
    if _PER_BACKEND:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = values
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = values


def out_of_memory_message(exc: BaseException, device: torch.device, step: int, batch_size: int, accum: int,
                          precision: str, checkpointing: str | None = None) -> str:
    """A CUDA out-of-memory error, restated with the run's batch, accumulation, precision, the
    device's memory figures and what to try. ``checkpointing``: the ``activation_checkpointing``
    patterns to suggest (``"blocks.*"``), or ``None`` when the run checkpoints already."""
    figures = ""
    if device.type == "cuda":
        gib = 2**30
        free, total = torch.cuda.mem_get_info(device)
        figures = (f" On {torch.cuda.get_device_name(device)}: {total / gib:.1f} GiB in all, "
                   f"{torch.cuda.memory_allocated(device) / gib:.1f} GiB allocated by tensors, "
                   f"{torch.cuda.memory_reserved(device) / gib:.1f} GiB reserved, "
                   f"peak {torch.cuda.max_memory_allocated(device) / gib:.1f} GiB, {free / gib:.1f} GiB free.")
    hints = {"fp32": "precision: bf16",
             # bf16 keeps fp32 weights, gradients and optimizer state: bf16-true holds them in half the memory.
             "bf16": "precision: bf16-true (weights, gradients and optimizer state in bf16: half their memory, "
                     "less accurate)"}
    hints = [hints.get(precision, "a smaller model")]
    if checkpointing is not None:
        hints.append(f"activation_checkpointing: [{checkpointing}] (activations recomputed in backward, not kept)")
    return (
        f"out of memory at step {step} with batch_size {batch_size} (x grad_accum_steps {accum}) in "
        f"{precision}.{figures} Try a smaller batch_size with a larger grad_accum_steps (same effective batch), "
        f"{', '.join(hints)}, or compile: true. ({str(exc).splitlines()[0]})"
    )
