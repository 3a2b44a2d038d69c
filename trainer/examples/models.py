"""Small models for the example configs."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """``in_features -> hidden x depth -> out_features`` with ReLU and optional dropout."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, depth: int = 2, dropout: float = 0.0):
        if depth < 1:
            raise ValueError(f"MLP depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
