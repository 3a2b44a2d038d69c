"""Small models and data shared by the tests, and the paths and checks the process tests use."""

import contextlib
import os
import socket
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# The scripts and modules that tests run as processes, or name in a config (killers.KillAt, ...).
PROJECT = ROOT / "tests" / "project"


def mlp(seed: int = 0, sizes=(8, 16, 3), dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def batches(n: int, size: int, seed: int = 1, features: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, features, generator=g)
        y = torch.randint(0, classes, (size,), generator=g)
        out.append((x, y))
    return out


def classification(n: int = 96, seed: int = 1, features: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, :classes].argmax(dim=1)).long()
    return x, y


def quiet(**overrides):
    """A TrainerConfig dict with the progress bar off and logging every step."""
    cfg = {"progress": "off", "log_every_n_steps": 1}
    cfg.update(overrides)
    return cfg


def process_env(**extra) -> dict:
    """The environment of a process a test starts: this checkout and tests/project/ importable."""
    path = os.pathsep.join([str(ROOT), str(PROJECT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def loopback_ok() -> bool:
    """Whether processes on this machine can open loopback sockets to each other (torchrun needs it)."""
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            a.listen(1)
            b.connect(a.getsockname())
        return True
    except OSError:
        return False


CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_conversions():
    """Counts every tensor-to-host conversion (a host sync on a GPU) made inside the block, by name."""
    counts = {name: 0 for name in CONVERSIONS}
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
