"""The names inside a run directory, in one place, and the atomic rewrite of its text files.
Torch-free, so ``trainer runs`` stays fast.

::

    <out_dir>/<name>/
        config.yaml            the resolved config the run trained with
        status.json            running | finished | interrupted | failed, with the pid
        metrics.jsonl          one JSON record per log point and evaluation
        metrics.csv            the same records as a table
        tensorboard/           with loggers: [tensorboard]
        checkpoints/
            step-00000100.pt   periodic and final checkpoints (a directory under strategy: fsdp)
            best-step-...      BestCheckpoints' files, best.pt (or best) links to the best one
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

CONFIG = "config.yaml"
STATUS = "status.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"

CHECKPOINT_NAME = re.compile(r"^step-(\d{8})(\.pt)?$")  # group 2: a file; without it, a sharded directory


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"step-{step:08d}" + ("" if sharded else ".pt")


def best_name(step: int, monitor: str, value: float, sharded: bool = False) -> str:
    return f"best-step-{step:08d}-{monitor.replace('/', '_')}={value:.4f}" + ("" if sharded else ".pt")


def best_link(sharded: bool = False) -> str:
    return "best" if sharded else "best.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The periodic checkpoints in a ``checkpoints/`` folder (final names only, never temp files),
    oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name))
             and (p.is_file() if m.group(2) else p.is_dir())]
    return [p for _, p in sorted(found)]


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` the way checkpoints are written: a temp file in the same
    folder, flushed and fsync'ed, renamed over ``path``, then the folder fsync'ed. A crash at any
    instant leaves the old content or the new, whole; never a file cut off part-way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # newline="": the text is written as given (a CSV's \r\n stays \r\n on every platform).
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # The rename is durable only once the folder's entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
