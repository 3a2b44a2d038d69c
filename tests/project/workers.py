"""Training data read by DataLoader workers, for runs that a test signals or kills the way schedulers
do (the whole process group, or the main process alone).

``data(kind, ...)``, for a config's ``data: {_target_: workers.data, kind: ...}``:

* ``dataset``: the Dataset itself (the Trainer builds its DataLoader);
* ``loader``: the user's own DataLoader with persistent workers, whose iterator was made before the
  run (its workers were started before the Trainer saw it);
* ``stateful``: the user's torchdata ``StatefulDataLoader``.

Each item takes ``delay`` seconds to read, so that a run lasts long enough to be signalled. A worker
whose ``stuck_at``-th read it is touches ``marker`` and stops itself with SIGSTOP: a read stuck for
good. With ``outlive_parent`` a worker whose main process died reads on for that many seconds (one
slow to notice: stuck in I/O, or a long read) before it ends. With ``signal_group`` the first read
of the run (the sanity pass's) sends that signal to the whole process group, once (``marker``
remembers it): a scheduler's signal that lands before training starts.
"""

import os
import signal
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


class Slow(torch.utils.data.Dataset):
    def __init__(self, n: int, delay: float, stuck_at: int | None, marker: str | None, outlive_parent: float,
                 signal_group: int | None = None):
        self.n, self.delay, self.stuck_at, self.marker = n, delay, stuck_at, marker
        self.signal_group = signal_group
        self.outlive_parent, self.parent = outlive_parent, os.getpid()
        self.reads = 0  # in the worker process that reads the item

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        if self.signal_group is not None and _first(self.marker):
            os.killpg(0, self.signal_group)
        if self.stuck_at is not None and self.reads >= self.stuck_at:
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(self.delay)
        if self.outlive_parent and os.getppid() != self.parent:
            time.sleep(self.outlive_parent)
        g = torch.Generator().manual_seed(i)
        return torch.randn(8, generator=g), i % 3


def _first(marker: str) -> bool:
    """Whether this process made ``marker``: of two workers reading at once, exactly one (a check for
    the file, then a touch, let both through and the run got two signals: "stop at once")."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def data(kind: str = "dataset", n: int = 256, delay: float = 0.0, num_workers: int = 2,
         stuck_at: int | None = None, marker: str | None = None, outlive_parent: float = 0.0,
         signal_group: int | None = None):
    dataset = Slow(n, delay, stuck_at, marker, outlive_parent, signal_group)
    if kind == "dataset":
        return {"train": dataset}
    if kind == "loader":
        loader = DataLoader(dataset, batch_size=4, num_workers=num_workers, persistent_workers=True)
        iter(loader)  # its workers start now, before the Trainer has seen the loader
        return {"train": loader}
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return {"train": StatefulDataLoader(dataset, batch_size=4, num_workers=num_workers)}
    raise ValueError(kind)
