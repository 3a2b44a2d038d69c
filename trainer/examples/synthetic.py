"""Generated data: no download, the same on every machine for a given seed."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def classification(n_train: int = 2048, n_val: int = 512, features: int = 16, classes: int = 4,
                   noise: float = 1.5, seed: int = 0, n_test: int = 0) -> dict[str, TensorDataset]:
    """Points around ``classes`` random centres in ``features`` dimensions; a ``test`` split too
    when ``n_test`` is set (drawn after the others, which it leaves as they were)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 2.0

    def sample(n: int) -> TensorDataset:
        y = torch.randint(0, classes, (n,), generator=g)
        x = centres[y] + noise * torch.randn(n, features, generator=g) * centres.std()
        return TensorDataset(x, y)

    splits = {"train": sample(n_train), "val": sample(n_val)}
    if n_test:
        splits["test"] = sample(n_test)
    return splits
