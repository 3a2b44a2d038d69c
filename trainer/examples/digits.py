"""scikit-learn's bundled handwritten digits (8x8 images, 1,797 samples): real data, no download."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def _load_arrays():
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits example needs scikit-learn: pip install 'trainer[examples]' (or pip install scikit-learn)"
        ) from None
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


def _split(val_fraction: float, seed: int):
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    x, y = _load_arrays()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    return (x[order[n_val:]], y[order[n_val:]]), (x[order[:n_val]], y[order[:n_val]])


def load(val_fraction: float = 0.2, seed: int = 0) -> dict[str, TensorDataset]:
    """Flattened 64-pixel images scaled to [0, 1] and their labels, split into train and val."""
    (xt, yt), (xv, yv) = _split(val_fraction, seed)
    return {"train": TensorDataset(xt, yt), "val": TensorDataset(xv, yv)}


def load_few_labels(labels_per_class: int = 5, val_fraction: float = 0.2, seed: int = 0) -> dict[str, TensorDataset]:
    """The same split, but only ``labels_per_class`` training images per class keep their label;
    the rest are marked ``-1`` (unlabelled), for semi-supervised training."""
    (xt, yt), (xv, yv) = _split(val_fraction, seed)
    kept = torch.full_like(yt, -1)
    for c in range(10):
        idx = (yt == c).nonzero().flatten()[:labels_per_class]
        kept[idx] = c
    return {"train": TensorDataset(xt, kept), "val": TensorDataset(xv, yv)}


def macro_f1(num_classes: int = 10):
    """The F1 score averaged over classes (each class counts the same, however rare), computed over
    the whole validation set: a torchmetrics metric, for the config's ``metrics:`` section."""
    try:
        from torchmetrics.classification import MulticlassF1Score
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits example's macro-F1 needs torchmetrics: pip install 'trainer[metrics]' (or pip install torchmetrics)"
        ) from None
    return MulticlassF1Score(num_classes=num_classes, average="macro")
