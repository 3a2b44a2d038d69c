"""Checkpoint files: atomic writes, safe loads, rotation, and RNG state as plain data.

A checkpoint is one ``torch.save`` file of plain data that ``torch.load(weights_only=True)``
reads: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``trainer_state``, ``rng``,
``callbacks``, ``config`` and ``version``. Loading never runs code from the file.

Every file carries the SHA-256 of its bytes, and nothing in it is unpickled before that digest
matches: the zip's per-record CRC32s miss damage to the zip's own metadata (one flipped bit in a
record's external attributes makes torch read uninitialised memory as the tensor), and a file
that loads can still lack parts. The digest lives in the zip's end-of-central-directory comment,
the last bytes of the file, as ``trainer-sha256:<64 hex digits>``, and covers every byte before
it. That keeps a checkpoint one ordinary zip that ``torch.load`` and ``zipfile`` read unchanged
and that is still renamed into place whole; the digest is computed while ``torch.save`` writes
(no extra pass on save), and checking it is one sequential read in 1 MiB pieces, which replaces
the CRC pass that older files get. A trailer after the zip would have worked too, but would need
every reader to be handed a bounded view of the file. A file whose own zip end record has no
comment was written before digests (format version 1 all along): it loads with a warning, after
the per-record CRC32 check and a check that every record is stored the way ``torch.save`` stores
it. After loading, the parts of the checkpoint and ``trainer_state``'s counters are checked for
presence and type, so a file that loads but is not a whole checkpoint is a ``CheckpointError``.

Under ``strategy: fsdp`` a checkpoint is a directory instead (``step-<step>/``): every rank writes
its shards of the model and optimizer state with ``torch.distributed.checkpoint`` (DCP), and rank 0
adds ``trainer.pt``, the file above without the sharded tensors, holding the size and SHA-256 of
every shard file; each rank hashes the files it wrote itself, and rank 0 gathers the digests. The
directory gets its final name only when all of it is on disk. DCP reads such a checkpoint on any
number of ranks, or in a single process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import pickle
import random
import re
import shutil
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.parallel import distributed
from trainer.run_dir import CHECKPOINT_NAME, checkpoint_dir, fsync_dir, list_checkpoints

# torch.distributed.checkpoint (DCP) is imported inside the functions of sharded checkpoints: a process
# that handles none does not load it, nor DTensor with it (half a second; `trainer export` of a file).

try:
    import numpy as np
except ImportError:  # numpy is optional: checkpoints then hold no numpy generator state
    np = None

VERSION = 1
# The parts every checkpoint holds; "states" and "unfrozen" came later and may be absent.
KEYS = ("version", "model", "optimizer", "scheduler", "scaler", "trainer_state", "rng", "callbacks", "config")
SHARDED_STATE = "trainer.pt"  # inside a sharded checkpoint directory: everything but the shards

_EOCD = b"PK\x05\x06"  # the zip's end-of-central-directory record: 22 bytes, then the comment
_EOCD_SIZE = 22
_DIGEST_PREFIX = b"trainer-sha256:"
_COMMENT_SIZE = len(_DIGEST_PREFIX) + 64
_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


class _DigestWriter:
    """The file object ``torch.save`` writes to: bytes go to the file and into the digest as they
    pass, except the newest 22, the zip's end record, whose comment length is set afterwards."""

    def __init__(self, file: Any):
        self.file, self.sha = file, hashlib.sha256()
        self.held = b""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self.file.write(view)
        if len(view) >= _EOCD_SIZE:
            self.sha.update(self.held)
            self.sha.update(view[:-_EOCD_SIZE])
            self.held = bytes(view[-_EOCD_SIZE:])
        else:
            joined = self.held + bytes(view)
            self.sha.update(joined[:-_EOCD_SIZE])
            self.held = joined[-_EOCD_SIZE:]
        return written

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def finish(self) -> None:
        """Give the zip its comment, the digest of every byte before it."""
        end = self.held
        if len(end) != _EOCD_SIZE or end[:4] != _EOCD or end[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end the file with a zip end record without a comment")
        end = end[:-2] + _COMMENT_SIZE.to_bytes(2, "little")
        self.sha.update(end)
        self.file.seek(-2, os.SEEK_END)
        self.file.write(end[-2:] + _DIGEST_PREFIX + self.sha.hexdigest().encode())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically, with its digest: a temp file in the same folder,
    flushed and fsync'ed, renamed over the final name, then the folder fsync'ed. A crash at any
    instant leaves either the old file set or the new one; a failure (full disk, no permission)
    removes the temp file and raises ``CheckpointError`` with earlier checkpoints untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _DigestWriter(f)
            torch.save(state, writer)
            writer.finish()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, (OSError, RuntimeError)):
            raise _write_failed(path, exc, state) from exc
        raise
    return path


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _write_failed(path: Path, exc: BaseException, state: Any = None) -> CheckpointError:
    """The error of a failed write. torch.save reports a failed write of its own as "[enforce fail
    at inline_container.cc:...] unexpected pos ..."; the OSError behind it says what happened."""
    cause = _os_error(exc)
    if cause is not None and cause.errno in _NO_SPACE:
        return CheckpointError(_no_space(path, cause, state))
    return CheckpointError(
        f"could not write checkpoint {path}: {cause or exc}. Earlier checkpoints are intact; free disk space "
        "or fix the folder's permissions, then resume with --resume auto"
    )


def _os_error(exc: BaseException | None) -> OSError | None:
    """``exc`` if it is an OSError, else the OSError it was raised from or while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _no_space(path: Path, cause: OSError, state: Any) -> str:
    """A full disk (or quota), said with the folder, what a checkpoint needs, and the newest
    checkpoint that is complete: the one a resume continues from."""
    folder = path.parent
    done = list_checkpoints(folder)
    needs = []
    with contextlib.suppress(OSError):
        needs.append(f"{_shown_bytes(shutil.disk_usage(folder).free)} free")
    if done:
        needs.append(f"a checkpoint of this run needs about {_shown_bytes(_size_on_disk(done[-1]))}, the size of "
                     f"{done[-1].name}")
    elif state is not None:
        needs.append(f"a checkpoint of this run needs about {_shown_bytes(_tensor_bytes(state))}, its tensors alone")
    last = (f"the last complete checkpoint is {done[-1]} (step {int(CHECKPOINT_NAME.match(done[-1].name).group(1))}), "
            "intact" if done else f"{folder} holds no complete checkpoint yet")
    return (f"could not write checkpoint {path}: {cause.strerror} in {folder}"
            f"{' (' + '; '.join(needs) + ')' if needs else ''}. The partial file is removed and {last}: free space "
            "on that disk, then continue with --resume auto")


def _size_on_disk(path: Path) -> int:
    """A checkpoint's bytes: a file's, or every file's of a sharded directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _tensor_bytes(tree: Any) -> int:
    """The bytes of the tensors in ``tree`` (each storage once): what a checkpoint of it needs at least."""
    storages: dict[Any, int] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            storage = node.untyped_storage()
            storages[(storage.data_ptr(), node.device)] = storage.nbytes()
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return sum(storages.values())


def _shown_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any failure is a ``CheckpointError``.

    The file's digest is checked before anything in it is unpickled, and what it holds is checked
    afterwards. For a sharded checkpoint (a directory) this reads its ``trainer.pt`` and checks
    that every shard file is there with its size and digest; the shards themselves load later,
    into the model (``load_sharded``). ``state["sharded"]`` then holds the directory. With ``mmap``
    a file's tensors stay in the file, mapped, and are read when used (for taking the weights alone
    out of a checkpoint that also holds the optimizer's state)."""
    path = Path(path)
    if path.is_dir():
        return _load_sharded_state(path)
    return _load_file(path, sharded=False, mmap=mmap)[0]


def special_kind(path: str | Path) -> str | None:
    """What ``path`` is when it is neither a regular file nor a directory (a device, a FIFO, a
    socket), told from its ``stat`` alone: opening a FIFO waits for a writer that may never come."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def signed(path: str | Path) -> bool:
    """Whether the file ends in the digest comment of a checkpoint written by trainer (not checked here)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < _EOCD_SIZE + _COMMENT_SIZE:
            return False
        f.seek(size - _COMMENT_SIZE)
        return f.read(len(_DIGEST_PREFIX)) == _DIGEST_PREFIX


def _load_file(path: Path, sharded: bool, mmap: bool = False) -> tuple[dict[str, Any], bool]:
    """The checkpoint file's state, and whether it carried a digest."""
    kind = special_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a checkpoint: name a checkpoint file trainer wrote "
                              "(runs/NAME/checkpoints/step-....pt) or a run directory")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was cut off while being written")
    try:
        has_digest = _check_digest(path)
        if not has_digest:
            _check_records(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds a pickled Python object, which could run code when loaded; refused. "
                "Checkpoints written by trainer hold plain tensors and values only"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupted ({exc})") from None
    except CheckpointError:
        raise
    except Exception as exc:  # damaged bytes make the zip reader or the unpickler raise almost anything
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(exc).__name__}: {first})") from None
    _check_layout(state, path, sharded, has_digest)
    if not has_digest:
        warnings.warn(
            f"checkpoint {path} carries no digest (written before trainer stored one); only its records' "
            "CRC32s were checked, which miss some damage. Checkpoints written from now on carry one",
            stacklevel=3,
        )
    return state, has_digest


def _check_digest(path: Path) -> bool:
    """Compare the file's bytes with the digest in its zip comment; False for a file written before
    digests, whose zip end record has no comment."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _EOCD_SIZE - _COMMENT_SIZE))
        tail = f.read()
        end, comment = tail[:-_COMMENT_SIZE][-_EOCD_SIZE:], tail[-_COMMENT_SIZE:]
        if (len(tail) == _EOCD_SIZE + _COMMENT_SIZE and end[:4] == _EOCD
                and end[-2:] == _COMMENT_SIZE.to_bytes(2, "little") and comment.startswith(_DIGEST_PREFIX)):
            f.seek(0)
            found = _sha256(f, size - _COMMENT_SIZE).encode()
            if found != comment[len(_DIGEST_PREFIX):]:
                raise CheckpointError(
                    f"checkpoint {path} is corrupted: its bytes do not match the SHA-256 digest it was written with"
                )
            return True
    if tail[-_EOCD_SIZE:][:4] == _EOCD and tail[-2:] == b"\0\0":
        return False
    raise CheckpointError(
        f"checkpoint {path} is truncated or corrupted: it ends in neither a digest nor a zip end record"
    )


def _sha256(f: Any, length: int) -> str:
    """The hex SHA-256 of the next ``length`` bytes of ``f``, read in pieces (memory stays bounded)."""
    sha, buffer = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buffer)
    while length > 0:
        n = f.readinto(view[: min(_CHUNK, length)])
        if not n:
            break
        sha.update(view[:n])
        length -= n
    return sha.hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256(f, os.fstat(f.fileno()).st_size)


def _check_records(path: Path) -> None:
    """For a file without a digest: every record's CRC32 (``torch.load`` checks none), and every record
    stored uncompressed with no attributes, as ``torch.save`` writes them; a record marked as a
    directory, for one, is read by torch as uninitialised memory."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.external_attr != 0:
                raise CheckpointError(
                    f"checkpoint {path} is corrupted: record {info.filename} is not stored the way torch.save "
                    f"stores records (compression {info.compress_type}, attributes {info.external_attr:#x})"
                )
        bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: record {bad} fails its CRC32 check")


# What restoring reads from a checkpoint, by dotted path, and the types it accepts. The counters of
# trainer_state belong to the Trainer (progress), nonfinite.py (skips) and metrics.py (the log interval).
_TENSOR, _NONE = torch.Tensor, type(None)
_LAYOUT: dict[str, tuple[type, ...]] = {
    # Several optimizers (Trainer.manual_step): lists of their states, in order.
    "model": (dict,), "optimizer": (dict, list), "optimizer.state": (dict,), "optimizer.param_groups": (list,),
    "scheduler": (dict, list, _NONE), "scaler": (dict,), "callbacks": (dict,), "config": (dict,),
    "trainer_state": (dict,),
    **{f"trainer_state.{name}": (int,) for name in (
        "global_step", "epoch", "batch_in_epoch", "consecutive_skips", "skipped_steps", "loss_count", "extra_count")},
    "trainer_state.loss_sums": (list,), "trainer_state.extra_sums": (list,), "trainer_state.extra_types": (dict,),
    "rng": (dict,), "rng.python": (dict,), "rng.python.version": (int,), "rng.python.state": (_TENSOR,),
    "rng.python.gauss": (float, _NONE), "rng.torch": (_TENSOR,), "rng.cuda": (list,),
}
_SHARDED_LAYOUT = {
    **{key: types for key, types in _LAYOUT.items() if key != "optimizer.state"},
    "model": (_NONE,), "shards": (dict,), "shard_sha256": (dict,),
}
_NUMPY_RNG = {"rng.numpy.kind": (str,), "rng.numpy.keys": (_TENSOR,), "rng.numpy.pos": (int,),
              "rng.numpy.has_gauss": (int,), "rng.numpy.cached": (float,)}


def _check_layout(state: Any, path: Path, sharded: bool, has_digest: bool) -> None:
    """A file that loads is a checkpoint only if it holds every part restoring reads, each of its type.
    A sharded one written before digests lists its shard files' sizes only."""
    if not isinstance(state, dict) or type(state.get("version")) is not int:
        what = f"keys: {', '.join(map(str, state))}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(f"{path} is not a trainer checkpoint (it holds {what}, and no format version)")
    if state["version"] != VERSION:
        raise CheckpointError(
            f"{path} is a checkpoint of format version {state['version']}; this trainer reads version {VERSION}"
        )
    if not sharded and "shards" in state:
        raise CheckpointError(f"{path} is the {SHARDED_STATE} of a sharded checkpoint; load its directory instead")
    layout = _SHARDED_LAYOUT if sharded else _LAYOUT
    if sharded and not has_digest and "shard_sha256" not in state:
        layout = {key: types for key, types in layout.items() if key != "shard_sha256"}
    if isinstance(state.get("rng"), dict) and "numpy" in state["rng"]:
        layout = {**layout, "rng.numpy": (dict,), **_NUMPY_RNG}
    problems: list[str] = []
    for dotted, types in layout.items():
        parent, _, name = dotted.rpartition(".")
        node = _at(state, parent)
        if not isinstance(node, dict):
            continue  # the parent is missing or of the wrong type, which is reported already
        if name not in node:
            problems.append(f"{dotted} is missing")
        elif not isinstance(node[name], types) or (isinstance(node[name], bool) and bool not in types):
            problems.append(f"{dotted} is a {type(node[name]).__name__}, not {' or '.join(t.__name__ for t in types)}")
    if not problems and not sharded:
        not_tensors = [k for k, v in state["model"].items() if not isinstance(v, _TENSOR) and not k.endswith("_extra_state")]
        problems += [f"model.{k} is a {type(state['model'][k]).__name__}, not a tensor" for k in not_tensors[:4]]
    if problems:
        raise CheckpointError(f"checkpoint {path} is not a whole trainer checkpoint: {'; '.join(problems[:6])}")


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split(".") if dotted else ():
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _load_sharded_state(path: Path) -> dict[str, Any]:
    if not (path / SHARDED_STATE).is_file():
        raise CheckpointError(f"checkpoint {path} is a directory without {SHARDED_STATE}: not a complete sharded checkpoint")
    state, has_digest = _load_file(path / SHARDED_STATE, sharded=True)
    shards, digests = state["shards"], state.get("shard_sha256", {})
    if not shards or (has_digest and set(digests) != set(shards)):
        raise CheckpointError(f"{path / SHARDED_STATE} does not list the checkpoint's shard files with their digests")
    for name, size in shards.items():
        file = path / name
        found = file.stat().st_size if file.is_file() else None
        if found != size:
            what = "is missing" if found is None else f"holds {found} bytes, {size} were written"
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupted: shard file {name} {what}")
    for name in shards:
        if name in digests and _sha256_file(path / name) != digests[name]:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: shard file {name} does not match the SHA-256 digest it was written with"
            )
    _check_dcp_metadata(path / ".metadata")
    state["sharded"] = str(path)
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """DCP stores its index with plain pickle, which could run code; this reads it with nothing but
    DCP's own metadata classes, torch dtypes and paths allowed, before DCP itself opens it."""

    def find_class(self, module: str, name: str) -> Any:
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


def sharded_metadata(directory: str | Path) -> Any:
    """The DCP index of a sharded checkpoint (``.metadata``), read with DCP's own classes only:
    ``state_dict_metadata`` maps every saved tensor (``model.<name>``, ``optimizer.<name>.<key>``)
    to its size and dtype."""
    return _check_dcp_metadata(Path(directory) / ".metadata")


def _check_dcp_metadata(path: Path) -> Any:
    import torch.distributed.checkpoint.metadata as dcp_meta

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint metadata {path} is unreadable or holds objects other than DCP metadata ({exc}); refused"
        ) from None
    pickled = [key for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, dcp_meta.BytesStorageMetadata)]
    if pickled:
        raise CheckpointError(
            f"checkpoint {path.parent} stores pickled objects ({', '.join(pickled[:4])}), which could run code "
            "when loaded; refused. Sharded checkpoints written by trainer hold tensors only"
        )
    return metadata


def save_sharded(state: dict[str, Any], tensors: dict[str, Any], path: str | Path, is_main: bool) -> Path:
    """Write a sharded checkpoint directory; called by every rank at once.

    ``tensors`` (model and optimizer state, sharded) go through DCP; ``state`` (the rest) is rank 0's
    ``trainer.pt``. The directory is assembled under a temporary name and renamed when complete, so
    a kill at any instant leaves earlier checkpoints and no half-written one under a final name."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = _begin_sharded(tensors, path, is_main)
    with _writing_sharded(path, tmp, is_main):
        dcp.save(tensors, checkpoint_id=tmp)  # collective; fsyncs its files
        _finish_sharded(state, path, tmp, is_main, group=None)
    return path


def start_sharded(state: dict[str, Any], tensors: dict[str, Any], path: str | Path, is_main: bool, group: Any,
                  stager: Any) -> Callable[[], None]:
    """The background form of ``save_sharded``, called by every rank at once: ``dcp.async_save``
    copies this rank's shards into CPU memory with ``stager`` and starts writing them; the function
    returned (for the writer thread) waits for that, then hashes, gathers the digests and renames as
    ``save_sharded`` does, with collectives on ``group`` only. ``state`` must be a copy already."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = _begin_sharded(tensors, path, is_main)
    with _writing_sharded(path, tmp, is_main):
        written = dcp.async_save(tensors, checkpoint_id=tmp, process_group=group, async_stager=stager)

    def finish() -> None:
        with _writing_sharded(path, tmp, is_main):
            written.result()  # DCP's thread has written and fsync'ed this rank's files
            _finish_sharded(state, path, tmp, is_main, group)

    return finish


def _begin_sharded(tensors: dict[str, Any], path: Path, is_main: bool) -> Path:
    """The checks and the empty temporary directory, on every rank; returns the directory."""
    others = [key for key, value in _leaves(tensors) if not isinstance(value, torch.Tensor)]
    if others:
        # DCP would pickle them, and loading pickles could run code.
        raise CheckpointError(f"a sharded checkpoint holds tensors only; {', '.join(others[:4])} are not tensors")
    tmp = path.with_name(f".{path.name}.tmp")  # the same name on every rank
    with _writing_sharded(path, tmp, is_main):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir(parents=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
    return tmp


@contextlib.contextmanager
def _writing_sharded(path: Path, tmp: Path, is_main: bool) -> Iterator[None]:
    """A failure removes the temporary directory (rank 0) and becomes a ``CheckpointError``."""
    try:
        yield
    except BaseException as exc:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise _write_failed(path, exc) from exc
        raise


def _finish_sharded(state: dict[str, Any], path: Path, tmp: Path, is_main: bool, group: Any) -> None:
    """Once DCP's files are on disk: the digests, ``trainer.pt`` and the rename."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if world > 1 else 0
    # Each rank hashes the files it wrote, in parallel and while they are likely still in its page cache.
    mine = {p.name: _sha256_file(p) for p in tmp.iterdir() if p.is_file() and _hashed_by(p.name, world) == rank}
    gathered: list[Any] = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
    if not is_main:
        return
    shards = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    digests = {name: digest for part in gathered for name, digest in part.items()}
    digests = {name: digests.get(name) or _sha256_file(tmp / name) for name in shards}
    save_checkpoint({**state, "shards": shards, "shard_sha256": digests}, tmp / SHARDED_STATE)
    if path.exists():  # the same step saved again: swap the old one out, then drop it
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def _hashed_by(name: str, world: int) -> int:
    """The rank that hashes a shard file: its writer, by DCP's naming (``__<rank>_<n>.distcp``);
    rank 0 for the rest (``.metadata``), and for any file whose name says no rank."""
    match = re.match(r"__(\d+)_", name)
    return int(match.group(1)) if match and int(match.group(1)) < world else 0


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
    """``--resume auto``: the newest checkpoint of the run that loads (``newest_good_checkpoint``);
    ``None`` (a fresh start) when the run has none. ``--resume PATH``: that file."""
    if resume != "auto":
        state = load_checkpoint(resume)
        state["path"] = str(resume)
        return state
    state = newest_good_checkpoint(run_dir, "resume")
    if distributed.from_env().rank == 0:  # under torchrun every rank looks; one says what it found
        print(f"resume: no checkpoint in {checkpoint_dir(run_dir)}; starting from scratch" if state is None else
              f"resume: continuing from {state['path']} (step {state['trainer_state']['global_step']})", flush=True)
    return state


def newest_good_checkpoint(run_dir: str | Path, purpose: str) -> dict[str, Any] | None:
    """The newest periodic checkpoint of the run that loads, falling back past damaged ones with a
    warning (each one's problem, then which one ``purpose`` falls back to); ``None`` when the run has
    none, and a ``CheckpointError`` when none loads. ``state["path"]`` holds where it came from."""
    bad: list[str] = []
    for path in reversed(list_checkpoints(checkpoint_dir(run_dir))):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; trying the previous checkpoint", stacklevel=3)
            bad.append(str(path))
            continue
        state["path"] = str(path)
        if bad:
            warnings.warn(f"{purpose}: {', '.join(bad)} could not be loaded; falling back to {path} "
                          f"(step {state['trainer_state']['global_step']})", stacklevel=3)
        return state
    if bad:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: {', '.join(bad)} all failed to load")
    return None


def link_best(target: Path, link: Path) -> None:
    """Point ``link`` (``best.pt``) at ``target`` with a hard link, replaced atomically. A sharded
    checkpoint (a directory) gets a relative symbolic link (``best``) instead."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    if target.is_dir():
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)
        return
    try:
        os.link(target, tmp)
    except OSError:  # a file system without hard links: a copy
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


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
    if np is None:
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
        npy = state["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype("uint32"), npy["pos"], npy["has_gauss"], npy["cached"]))


# ----------------------------------------------------------------------------- checks on load


def mismatch(expected: dict[str, Any], found: dict[str, Any], found_in: str = "the checkpoint",
             now: str = "now") -> tuple[list[str], list[str], list[str]]:
    """What keeps a state (``found``: name -> shape) from loading into a model whose state has the
    shapes ``expected``, as three lists: the names missing from ``found``, those not in the model,
    and those of another shape (described as "<name> <shape> in <found_in> vs <shape> <now>")."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {tuple(found[k])} in {found_in} vs {tuple(shape)} {now}"
                for k, shape in expected.items() if k in found and tuple(found[k]) != tuple(shape)]
    return missing, unexpected, reshaped


def describe_mismatch(missing: list[str], unexpected: list[str], reshaped: list[str],
                      found_in: str = "the checkpoint") -> str:
    """The lists of ``mismatch`` as one clause for a message (eight names of each at most)."""
    def shown(names: list[str], sep: str = ", ") -> str:
        return sep.join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    problems = []
    if missing:
        problems.append(f"missing from {found_in}: {shown(missing)}")
    if unexpected:
        problems.append(f"not in the model: {shown(unexpected)}")
    if reshaped:
        problems.append(f"different shapes: {shown(reshaped, '; ')}")
    return "; ".join(problems)


def check_model_state(module: torch.nn.Module, saved: dict[str, torch.Tensor], where: str) -> None:
    """Name every missing, unexpected or reshaped key before ``load_state_dict`` would fail."""
    expected = {k: getattr(v, "shape", ()) for k, v in module.state_dict().items()}
    problems = describe_mismatch(*mismatch(expected, {k: getattr(v, "shape", ()) for k, v in saved.items()}))
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not match the model ({problems}); "
            "resume with the config the run was started with, or start a new run"
        )
