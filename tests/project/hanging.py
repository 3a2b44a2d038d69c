"""A user's script whose data worker hangs after a few batches: SIGTERM can only end it when sent
twice (or, with ``--timeout``, the run ends on its own with a DataError)."""

import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from trainer import Trainer


class Hangs(torch.utils.data.Dataset):
    """Delivers 16 samples (four batches of 4), then hangs on the next, whatever the order."""

    def __init__(self):
        self.calls = 0  # counted in the worker process, which reads every sample here

    def __len__(self):
        return 64

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > 16:
            if os.environ.get("HANGING_MARKER"):
                Path(os.environ["HANGING_MARKER"]).touch()  # the test waits for this, not for a guess
            time.sleep(3600)  # a stuck network read, a deadlocked decoder
        return torch.randn(8), i % 3


if __name__ == "__main__":
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else None
    model = torch.nn.Linear(8, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), Hangs(), loss_fn=F.cross_entropy,
                      config={"batch_size": 4, "num_workers": 1, "progress": "off", "log_every_n_steps": 1,
                              "eval_every_n_epochs": None, "data_timeout": timeout})
    print("training", flush=True)
    trainer.fit()


def data():
    """For a config: ``data: {_target_: hanging.data}``."""
    return {"train": Hangs()}
