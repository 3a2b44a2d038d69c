"""What checkpoints cost: saving and loading one of a ~50 MB model with the SHA-256 digest and
without it; with --stall, the training loop's stall per save, synchronous and checkpoint.async.

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

With ``--stall``, how long the training loop is blocked per checkpoint, synchronous against
``checkpoint.async``, on a model of ``--mb`` MB of float32 weights trained with AdamW (so the
checkpoint holds three times that):

    python scripts/bench_checkpoint.py --stall [--mb 50] [--runs 5] [--saves 4] [--device cpu|cuda]

Each run is one ``fit`` of ``--saves`` x 10 steps with a checkpoint every 10 steps; the stall is
the time inside each ``save_checkpoint`` call (on CUDA from a synchronized start, so queued work
is not counted). Lines: every save of every run, the first save of each run alone (the CPU copy's
buffers are allocated, and pinned on CUDA, then), and the whole fit.
"""

from __future__ import annotations

import argparse
import os
import shutil
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


class TimedSaves(Trainer):
    """A Trainer that times each of its saves: the time its loop is blocked."""

    stalls: list[float]

    def save_checkpoint(self, *args, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued steps are not the checkpoint's cost
        start = time.perf_counter()
        path = super().save_checkpoint(*args, **kwargs)
        self.stalls.append(time.perf_counter() - start)
        return path


def stall(megabytes: int, runs: int, saves: int, device: str, folder: Path) -> None:
    width = 1024 if megabytes < 1024 else 4096
    layers = max(1, round(megabytes * 2**20 / (4 * width * width)))
    every = 10
    data = [(torch.randn(16, width), torch.randn(16, width)) for _ in range(every * saves)]
    results: dict[str, list[list[float]]] = {}
    fits: dict[str, list[float]] = {}
    for run in range(runs):
        for mode in ("sync", "async"):
            model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
            trainer = TimedSaves(model, lambda params: torch.optim.AdamW(params, lr=1e-4), data,
                                 loss_fn=nn.functional.mse_loss, run_dir=folder / f"{mode}-{run}",
                                 config={"progress": "off", "device": device, "max_epochs": 1,
                                         "batch_size": 16, "log_every_n_steps": every, "sanity_check": False,
                                         "checkpoint": {"every_n_steps": every, "keep_last": 1, "save_final": False,
                                                        "async": mode == "async"}})
            trainer.stalls = []
            start = time.perf_counter()
            trainer.fit()
            fits.setdefault(mode, []).append(time.perf_counter() - start)
            results.setdefault(mode, []).append(trainer.stalls)
            shutil.rmtree(folder / f"{mode}-{run}")
    n = sum(p.numel() for p in model.parameters())
    print(f"{n * 4 / 2**20:.0f} MiB of weights on {device} ({layers} x Linear({width}, {width})), AdamW: checkpoints "
          f"of {3 * n * 4 / 2**20:.0f} MiB; {runs} runs x {saves} saves; median [min, max] s")
    for mode in ("sync", "async"):
        every_save = [t for stalls in results[mode] for t in stalls]
        first = [stalls[0] for stalls in results[mode]]
        for name, times in ((f"{mode}: stall per save", every_save), (f"{mode}: first save", first),
                            (f"{mode}: fit, {every * saves} steps", fits[mode])):
            print(f"{name:28} {statistics.median(times):7.3f}  [{min(times):.3f}, {max(times):.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--stall", action="store_true", help="time the loop's stall per save, sync vs async")
    parser.add_argument("--saves", type=int, default=4, help="with --stall: checkpoints per run")
    parser.add_argument("--device", default="cpu", help="with --stall: cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stall:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            stall(args.mb, args.runs, args.saves, args.device, Path(folder))
        return
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
