"""DataLoader workers under a storm of SIGTERMs: does every epoch still end?

A scheduler's SIGTERM can reach a worker at any instant, including while torch's worker loop holds
a lock of its own (it asks its "done" event between batches). Here one worker, set up as the
Trainer builds its loaders (``worker_settings``), gets a SIGTERM every ``--interval-ms``
while its loader reads single-item batches; each epoch runs in a subprocess given ``--limit-s``.
Prints, per epoch, its batches and seconds, or that it did not end. Nothing is asserted.

    python scripts/signal_storm.py --epochs 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPOCH = """
import os, signal, threading, time
import torch
from torch.utils.data import DataLoader, TensorDataset
from trainer.data.workers import worker_settings

loader = DataLoader(TensorDataset(torch.arange({items}.0)), batch_size=1, num_workers=1,
                    **worker_settings(None, num_workers=1))
it = iter(loader)
next(it)
pid = it._workers[0].pid

def storm():
    while True:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # the worker has ended
            return
        time.sleep({interval_ms} / 1000)

threading.Thread(target=storm, daemon=True).start()
print(1 + sum(1 for _ in it), flush=True)
os._exit(0)  # the storm thread would outlive the worker
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--interval-ms", type=float, default=0.2)
    parser.add_argument("--limit-s", type=float, default=120)
    args = parser.parse_args()
    # Run from a file, as a user's script is: the same epoch under ``python -c`` went through eight
    # epochs of storm with a handler that hangs in every epoch run from a file.
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "epoch.py"
        script.write_text(EPOCH.format(items=args.items, interval_ms=args.interval_ms))
        for epoch in range(1, args.epochs + 1):
            run_epoch(epoch, script, args)


def run_epoch(epoch: int, script: Path, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=args.limit_s)
    except subprocess.TimeoutExpired:
        print(f"epoch {epoch}: did not end within {args.limit_s:g} s")
        return
    took = time.perf_counter() - start
    if out.returncode != 0:
        print(f"epoch {epoch}: exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    else:
        print(f"epoch {epoch}: {out.stdout.strip()} of {args.items} batches in {took:.1f} s")


if __name__ == "__main__":
    main()
