"""What the checkpoint digest costs: saving and loading a checkpoint of a ~50 MB model, with the
SHA-256 digest and without it.

    python scripts/bench_checkpoint.py [--mb 50] [--runs 5] [--dir DIR]

The model is a stack of float32 linear layers (plain SGD, so the optimizer adds no state); the
checkpoint is what the Trainer writes. Each variant runs ``--runs`` times; the line gives the
median and the range in seconds. Files go to ``--dir`` (default: a temporary folder on the disk
that holds the system's temp dir) and stay in the page cache between save and load, so a load
here reads memory, not the disk: the hashing is what differs.

- save, digest: ``save_checkpoint`` (temp file, SHA-256 while ``torch.save`` writes, fsync, rename)
- save, no digest: the same write without the digest, as before digests existed
- load, digest: ``load_checkpoint`` (the SHA-256 pass, ``torch.load``, the layout check)
- load, no digest: ``load_checkpoint`` of a file without one (the CRC32 pass instead, same checks)
- torch.load alone: no check at all, for scale
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from trainer import Trainer
from trainer.checkpoint import load_checkpoint, save_checkpoint


def state_of(megabytes: int) -> dict:
    width = 1024
    layers = max(1, round(megabytes * 2**20 / (4 * width * width)))
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [], config={"progress": "off"})
    return trainer.state_dict()


def save_without_digest(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def timed(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = state_of(args.mb)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        with_digest, without = Path(folder) / "digest.pt", Path(folder) / "plain.pt"
        results = {
            "save, digest": timed(lambda: save_checkpoint(state, with_digest), args.runs),
            "save, no digest": timed(lambda: save_without_digest(state, without), args.runs),
        }
        print(f"checkpoint: {with_digest.stat().st_size / 2**20:.1f} MiB, {args.runs} runs each; median [min, max] s")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "carries no digest"
            results["load, digest"] = timed(lambda: load_checkpoint(with_digest), args.runs)
            results["load, no digest"] = timed(lambda: load_checkpoint(without), args.runs)
        results["torch.load alone"] = timed(lambda: torch.load(with_digest, map_location="cpu", weights_only=True),
                                            args.runs)
    for name, times in results.items():
        print(f"{name:18} {statistics.median(times):7.3f}  [{min(times):.3f}, {max(times):.3f}]")


if __name__ == "__main__":
    main()
