"""A callback of a user's project that records which training samples each optimizer step took,
one JSON line per micro-batch in a file per process, to check a resumed run's data order."""

import json
import os
from pathlib import Path

from trainer import Callback


class SeenSamples(Callback):
    """Samples are told apart by their inputs: the training data's first tensor, row by row."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.index: dict[tuple[float, ...], int] | None = None

    def on_train_batch_start(self, trainer, batch):
        if self.index is None:
            rows = trainer.train_data.tensors[0] if hasattr(trainer.train_data, "tensors") else trainer.train_data[0]
            self.index = {tuple(row.tolist()): i for i, row in enumerate(rows)}
        ids = [self.index[tuple(row.tolist())] for row in batch[0].cpu()]
        record = {"rank": trainer.layout.rank, "world": trainer.layout.world_size, "epoch": trainer.epoch,
                  "step": trainer.global_step + 1, "accum": trainer.config.grad_accum_steps, "ids": ids}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

