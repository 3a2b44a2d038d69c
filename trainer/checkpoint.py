"""Checkpoint files: atomic writes, safe loads, rotation, and RNG state as plain data.

A checkpoint is one ``torch.save`` file of plain data that ``torch.load(weights_only=True)``
reads: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``trainer_state``, ``rng``,
``callbacks``, ``config`` and ``version``. Loading never runs code from the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

VERSION = 1
KEYS = ("version", "model", "optimizer", "scheduler", "scaler", "trainer_state", "rng", "callbacks", "config")
_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (final names only, never temp files), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, flushed and fsync'ed,
    renamed over the final name, then the folder fsync'ed. A crash at any instant leaves either the
    old file set or the new one; a failure (full disk, no permission) removes the temp file and
    raises ``CheckpointError`` with earlier checkpoints untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, (OSError, RuntimeError)):
            raise CheckpointError(
                f"could not write checkpoint {path}: {exc}. Earlier checkpoints are intact; free disk space "
                "or fix the folder's permissions, then resume with --resume auto"
            ) from exc
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any failure is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was cut off while being written")
    try:
        # torch.load does not verify the CRC32 that the zip format stores for every record; a flipped
        # bit inside a tensor would load silently. Reading the file once more costs far less than
        # resuming from corrupted weights.
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupted: record {bad} fails its CRC32 check")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds a pickled Python object, which could run code when loaded; refused. "
                "Checkpoints written by trainer hold plain tensors and values only"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupted ({exc})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({first})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION or not set(KEYS) <= set(state):
        raise CheckpointError(
            f"{path} is not a trainer checkpoint of format version {VERSION} "
            f"(keys: {sorted(state) if isinstance(state, dict) else type(state).__name__})"
        )
    return state


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> dict[str, Any] | None:
    """``--resume auto``: the newest checkpoint of the run that loads, falling back past bad ones
    with a warning; ``None`` (a fresh start) when the run has none. ``--resume PATH``: that file."""
    if resume != "auto":
        state = load_checkpoint(resume)
        state["path"] = str(resume)
        return state
    files = list_checkpoints(Path(run_dir) / "checkpoints")
    if not files:
        print(f"resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; starting from scratch", flush=True)
        return None
    bad: list[str] = []
    for path in reversed(files):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; trying the previous checkpoint", stacklevel=2)
            bad.append(str(path))
            continue
        state["path"] = str(path)
        print(f"resume: continuing from {path} (step {state['trainer_state']['global_step']})", flush=True)
        return state
    raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: {', '.join(bad)} all failed to load")


def link_best(target: Path, link: Path) -> None:
    """Point ``link`` (``best.pt``) at ``target`` with a hard link, replaced atomically."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # a file system without hard links: a copy
        import shutil

        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def rotate(directory: str | Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    if keep_last is None:
        return
    for path in list_checkpoints(directory)[:-keep_last]:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and every CUDA device's generator state, as tensors and primitives."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        npy = state["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype("uint32"), npy["pos"], npy["has_gauss"], npy["cached"]))


# ----------------------------------------------------------------------------- checks on load


def check_model_state(module: torch.nn.Module, saved: dict[str, torch.Tensor], where: str) -> None:
    """Name every missing, unexpected or reshaped key before ``load_state_dict`` would fail."""
    current = module.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    reshaped = [f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(v.shape)} now"
                for k, v in current.items() if k in saved and saved[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:8])}")
    if reshaped:
        problems.append(f"different shapes: {'; '.join(reshaped[:8])}")
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not match the model ({'; '.join(problems)}); "
            "resume with the config the run was started with, or start a new run"
        )
