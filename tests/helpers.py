"""Small models and data shared by the tests."""

import torch
from torch import nn


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
