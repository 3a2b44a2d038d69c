"""Cost per batch of the in-memory tensor path against ``DataLoader(TensorDataset, shuffle=True)``.

    python scripts/bench_data.py

Same data as the overhead benchmark's tiny workload (64 samples of 32 features a batch), one CPU
thread, median of 5 passes over 3,000 batches each.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from trainer.data.sources import TensorSource


def per_batch(batches) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in batches)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    torch.set_num_threads(1)
    x, y = torch.randn(64 * 3000, 32), torch.randint(0, 10, (64 * 3000,))
    source = TensorSource((x, y), batch_size=64, seed=0, shuffle=True, device=torch.device("cpu"))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    sliced, loaded = [], []
    for epoch in range(5):
        sliced.append(per_batch(source.epoch(epoch, 0)))
        loaded.append(per_batch(loader))
    print(f"TensorSource (index slicing): {statistics.median(sliced):8.1f} us/batch")
    print(f"DataLoader(TensorDataset):    {statistics.median(loaded):8.1f} us/batch")


if __name__ == "__main__":
    main()
