"""Data components of a user's project for the stateful-loader and streaming tests.

``logged_classification`` returns a torchdata ``StatefulDataLoader`` over a dataset that appends
every index it reads to the file named by ``READS_LOG`` (when set), so a test can see exactly which
samples a run read, and in what order.
"""

import os

import torch
from torch.utils.data import Dataset, TensorDataset


class LoggedDataset(Dataset):
    def __init__(self, x, y, log=None):
        self.x, self.y, self.log = x, y, log

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{i}\n")
        return self.x[i], self.y[i]


def logged_classification(n_train: int = 48, n_val: int = 16, batch_size: int = 8, num_workers: int = 0):
    from torchdata.stateful_dataloader import StatefulDataLoader

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + n_val, 16, generator=g), torch.randint(0, 4, (n_train + n_val,), generator=g)
    train = LoggedDataset(x[:n_train], y[:n_train], os.environ.get("READS_LOG"))
    loader = StatefulDataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    return {"train": loader, "val": TensorDataset(x[n_train:], y[n_train:])}
