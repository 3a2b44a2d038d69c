"""Checkpoint files: atomic writes, safe loads, rotation, and RNG state as plain data.

A checkpoint is one ``torch.save`` file of plain data that ``torch.load(weights_only=True)``
reads: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``trainer_state``, ``rng``,
``callbacks``, ``config`` and ``version``. Loading never runs code from the file.

Under ``strategy: fsdp`` a checkpoint is a directory instead (``step-<step>/``): every rank writes
its shards of the model and optimizer state with ``torch.distributed.checkpoint`` (DCP), and rank 0
adds ``trainer.pt``, the file above without the sharded tensors, holding the size of every shard
file. The directory gets its final name only when all of it is on disk. DCP reads such a
checkpoint on any number of ranks, or in a single process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.run_dir import checkpoint_dir, checkpoint_name, list_checkpoints  # noqa: F401 (re-exported)

VERSION = 1
KEYS = ("version", "model", "optimizer", "scheduler", "scaler", "trainer_state", "rng", "callbacks", "config")
SHARDED_STATE = "trainer.pt"  # inside a sharded checkpoint directory: everything but the shards


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


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
            raise _write_failed(path, exc) from exc
        raise
    return path


def _write_failed(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"could not write checkpoint {path}: {exc}. Earlier checkpoints are intact; free disk space "
        "or fix the folder's permissions, then resume with --resume auto"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any failure is a ``CheckpointError``.

    For a sharded checkpoint (a directory) this reads its ``trainer.pt`` and checks that every
    shard file is there at its full size; the shards themselves load later, into the model
    (``load_sharded``). ``state["sharded"]`` then holds the directory."""
    path = Path(path)
    if path.is_dir():
        return _load_sharded_state(path)
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


def _load_sharded_state(path: Path) -> dict[str, Any]:
    if not (path / SHARDED_STATE).is_file():
        raise CheckpointError(f"checkpoint {path} is a directory without {SHARDED_STATE}: not a complete sharded checkpoint")
    state = load_checkpoint(path / SHARDED_STATE)
    shards = state.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise CheckpointError(f"{path / SHARDED_STATE} does not list the checkpoint's shard files")
    for name, size in shards.items():
        file = path / name
        found = file.stat().st_size if file.is_file() else None
        if found != size:
            what = "is missing" if found is None else f"holds {found} bytes, {size} were written"
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupted: shard file {name} {what}")
    _check_dcp_metadata(path / ".metadata")
    state["sharded"] = str(path)
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """DCP stores its index with plain pickle, which could run code; this reads it with nothing but
    DCP's own metadata classes, torch dtypes and paths allowed, before DCP itself opens it."""

    def find_class(self, module: str, name: str) -> Any:
        import pathlib

        import torch.distributed.checkpoint.filesystem as dcp_fs
        import torch.distributed.checkpoint.metadata as dcp_meta

        found = None
        if module in (dcp_meta.__name__, dcp_fs.__name__):
            found = getattr(dcp_meta if module == dcp_meta.__name__ else dcp_fs, name, None)
            found = found if isinstance(found, type) else None  # classes (and enums) only, no functions
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            found = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            found = torch.serialization._get_layout
        elif module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
            found = getattr(pathlib, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return found


def _check_dcp_metadata(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint metadata {path} is unreadable or holds objects other than DCP metadata ({exc}); refused"
        ) from None
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    pickled = [key for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, BytesStorageMetadata)]
    if pickled:
        raise CheckpointError(
            f"checkpoint {path.parent} stores pickled objects ({', '.join(pickled[:4])}), which could run code "
            "when loaded; refused. Sharded checkpoints written by trainer hold tensors only"
        )


def save_sharded(state: dict[str, Any], tensors: dict[str, Any], path: str | Path, is_main: bool) -> Path:
    """Write a sharded checkpoint directory; called by every rank at once.

    ``tensors`` (model and optimizer state, sharded) go through DCP; ``state`` (the rest) is rank 0's
    ``trainer.pt``. The directory is assembled under a temporary name and renamed when complete, so
    a kill at any instant leaves earlier checkpoints and no half-written one under a final name."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    others = [key for key, value in _leaves(tensors) if not isinstance(value, torch.Tensor)]
    if others:
        # DCP would pickle them, and loading pickles could run code.
        raise CheckpointError(f"a sharded checkpoint holds tensors only; {', '.join(others[:4])} are not tensors")
    tmp = path.with_name(f".{path.name}.tmp")  # the same name on every rank
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir(parents=True)
        if world > 1:
            dist.barrier()
        dcp.save(tensors, checkpoint_id=tmp)  # collective; fsyncs its files
        if is_main:
            shards = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            save_checkpoint({**state, "shards": shards}, tmp / SHARDED_STATE)
            if path.exists():  # the same step saved again: swap the old one out, then drop it
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException as exc:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise _write_failed(path, exc) from exc
        raise
    return path


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), tree)]


def load_sharded(tensors: dict[str, Any], path: str | Path) -> None:
    """Fill ``tensors`` (state dicts of this run's model and optimizer, sharded or not) in place
    from a sharded checkpoint; DCP reshards to this run's layout."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(tensors, checkpoint_id=path)
    except Exception as exc:  # DCP wraps rank failures in its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} does not fit this model and optimizer ({first}); "
            "resume with the config the run was started with"
        ) from None


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> dict[str, Any] | None:
    """``--resume auto``: the newest checkpoint of the run that loads, falling back past bad ones
    with a warning; ``None`` (a fresh start) when the run has none. ``--resume PATH``: that file."""
    if resume != "auto":
        state = load_checkpoint(resume)
        state["path"] = str(resume)
        return state
    files = list_checkpoints(checkpoint_dir(run_dir))
    if not files:
        print(f"resume: no checkpoint in {checkpoint_dir(run_dir)}; starting from scratch", flush=True)
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
    raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: {', '.join(bad)} all failed to load")


def link_best(target: Path, link: Path) -> None:
    """Point ``link`` (``best.pt``) at ``target`` with a hard link, replaced atomically. A sharded
    checkpoint (a directory) gets a relative symbolic link (``best``) instead."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    if target.is_dir():
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
        _fsync_dir(link.parent)
        return
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
        remove(path)


def remove(path: Path) -> None:
    """Delete a checkpoint, file or directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
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
