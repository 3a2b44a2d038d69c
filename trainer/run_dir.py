"""The names inside a run directory, in one place, and the atomic rewrite of its text files.
Torch-free, so ``trainer runs`` stays fast.

::

    <out_dir>/<name>/
        .lock                  held by the live run (a lockf record lock), with its pid
        config.yaml            the resolved config the run trained with
        status.json            running | finished | interrupted | failed, with the pid
        metrics.jsonl          one JSON record per log point and evaluation
        metrics.csv            the same records as a table
        test.json              the latest Trainer.test report: its test/ metrics and step
        tensorboard/           with loggers: [tensorboard]
        checkpoints/
            step-00000100.pt   periodic and final checkpoints (a directory under strategy: fsdp)
            best-step-...      BestCheckpoints' files, best.pt (or best) links to the best one
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

CONFIG = "config.yaml"
STATUS = "status.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TEST = "test.json"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"

# What makes a folder a run directory: a folder holding none of them is someone else's, never ours
# to write into or delete.
OWN = (CONFIG, STATUS, METRICS_JSONL, CHECKPOINTS)

# A run name is one path component. Bytes, not characters, because file systems count bytes (255 per
# component); 100 leaves room for what gets added to a name (name=t-2, a copy's suffix).
NAME_MAX_BYTES = 100

# Left by a save that was killed: .step-00000100.pt.tmp-4242 (a file), .step-00000100.tmp (a sharded
# directory), .best.pt.tmp-4242, .status.json.tmp. Never a checkpoint, removed at the run's next start.
TEMP_NAME = re.compile(r"^\..+\.tmp(-\d+)?$")

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
    """Replace ``path`` with ``text`` the way checkpoints are written (see ``write_atomic``)."""

    def write(tmp: Path) -> None:
        # newline="": the text is written as given (a CSV's \r\n stays \r\n on every platform).
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    write_atomic(path, write)


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temp file in the same folder, fsync'ed, renamed over ``path``, then the
    folder fsync'ed. A crash at any instant leaves the old content or the new, whole; never a file
    cut off part-way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)  # the rename is durable only once the folder's entry is on disk


def replace_text(path: Path, text: str) -> None:
    """``text`` written beside ``path`` and renamed over it: a full disk leaves the earlier file whole.
    (No fsync: the run's record files are rewritten at each start and end, not kept like checkpoints.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    """``running`` (with the pid) when a run starts; ``finished``, ``interrupted``, ``requeued`` (a SLURM job
    requeued after its signal) or ``failed`` when it ends."""
    replace_text(Path(run_dir) / STATUS, json.dumps({"status": status, "pid": os.getpid(), **extra}))


def ending(stop_reason: str | None, should_stop: bool) -> str:
    """Why a run ended, for ``status.json`` and the command's summary line."""
    if stop_reason:
        return stop_reason
    return "stopped (should_stop set, no reason given)" if should_stop else "finished"


class RunRecord:
    """What a fit leaves in its run directory, from the command line or from code alike: the lock
    while it runs, ``config.yaml`` and ``status.json``. Rank 0 alone; nothing without a run directory."""

    def __init__(self, run_dir: Path | None, main: bool, config: dict[str, Any]):
        self.run_dir = run_dir if main else None
        self.config = config  # what trains, as config.yaml holds it
        self._started = False  # status.json says running: the end of this fit is this record's to write

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The run directory's lock for the length of a fit, so that a second process fitting into it
        is refused; unless this process holds it already (``trainer run`` takes it before building)."""
        if self.run_dir is None:
            yield
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock: RunLock | None = RunLock(self.run_dir)
        except RunDirBusy as exc:
            if exc.pid != os.getpid():
                raise
            lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def start(self) -> None:
        """``status.json`` says running, with the pid; ``config.yaml`` holds the config, what trains
        from here on. A ``config.yaml`` that no run wrote (none has a status beside it) is the user's
        and is left as it is: refused."""
        if self.run_dir is None:
            return
        if (self.run_dir / CONFIG).exists() and not (self.run_dir / STATUS).exists():
            raise FileExistsError(f"run_dir {self.run_dir} holds a {CONFIG} that no run wrote (no {STATUS} beside it); "
                                  f"a run writes its own {CONFIG} there: move the file or pass another run_dir")
        write_status(self.run_dir, "running")
        self._started = True
        replace_text(self.run_dir / CONFIG, yaml.safe_dump(self.config, sort_keys=False))

    def ended(self, step: int, stop_reason: str | None, should_stop: bool, status: str) -> None:
        """A fit that returned, with why (``ending``). ``status``: finished, interrupted (a stop signal)
        or requeued (a SLURM job's requeue signal)."""
        if self._started:
            self._started = False
            write_status(self.run_dir, status, step=step, reason=ending(stop_reason, should_stop))

    def failed(self, exc: BaseException, step: int) -> None:
        """``interrupted`` after Ctrl-C or a second stop signal, else ``failed``, with the error."""
        if self._started:
            self._started = False
            with contextlib.suppress(OSError):  # a full disk may refuse this last word too
                write_status(self.run_dir, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                             error=f"{type(exc).__name__}: {exc}"[:500], step=step)


def fsync_dir(directory: Path) -> None:
    """Put a folder's entries (a rename, a link, a new file) on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run directory, or None: it must be one folder inside out_dir."""
    if name in (".", ".."):
        return f"{name!r} is not a folder of its own; a run name is one folder name such as digits-2"
    if "/" in name or "\\" in name:
        return "a run name is one folder name, without '/' or '\\'; put the folder above it in out_dir"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a run name cannot hold control characters (NUL, newline, tab)"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "a run name must be valid text (it holds a lone surrogate)"
    if size > NAME_MAX_BYTES:
        return f"a run name is at most {NAME_MAX_BYTES} bytes in UTF-8; this one has {size}"
    return None


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder that holds a run's files (an empty folder is not)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and any((path / name).exists() for name in OWN)


def contents(run_dir: str | Path) -> list[Path]:
    """What a run directory holds besides its lock file."""
    run_dir = Path(run_dir)
    return [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete what killed saves left behind (see ``TEMP_NAME``); returns what went. Call it holding the lock."""
    run_dir = Path(run_dir)
    found = [p for folder in (run_dir, checkpoint_dir(run_dir)) if folder.is_dir() and not folder.is_symlink()
             for p in folder.iterdir() if TEMP_NAME.match(p.name)]
    for path in found:
        _delete(path)
    return found


def earlier_run(run_dir: str | Path) -> list[str]:
    """What in ``run_dir`` an earlier run left that a new one would append to or replace: metric
    records, checkpoints. Empty when there is none."""
    run_dir = Path(run_dir)
    found = [name for name in (METRICS_JSONL, METRICS_CSV)
             if (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0]
    checkpoints = checkpoint_dir(run_dir)
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"{CHECKPOINTS}/")
    return found


def remove_run_outputs(run_dir: str | Path) -> None:
    """Delete an earlier run's metric files, test report and checkpoints (``fit(overwrite=True)``);
    the rest of the folder is left as it is."""
    run_dir = Path(run_dir)
    for name in (METRICS_JSONL, METRICS_CSV, TEST):
        (run_dir / name).unlink(missing_ok=True)
    checkpoints = checkpoint_dir(run_dir)
    if checkpoints.is_symlink():
        checkpoints.unlink()
    elif checkpoints.is_dir():
        shutil.rmtree(checkpoints)


def clear(run_dir: str | Path) -> None:
    """Delete everything in a run directory but its lock file, so the lock stays held throughout.
    Links inside are removed, never followed. Call it holding the lock."""
    for path in contents(run_dir):
        _delete(path)


def _delete(path: Path) -> None:
    """A file, a link (never followed) or a folder with everything in it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class RunDirBusy(Exception):
    """Another live process holds the run directory's lock."""

    def __init__(self, run_dir: Path, pid: int | None):
        self.run_dir, self.pid = run_dir, pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{run_dir} is in use by a live run ({holder}, see {run_dir / LOCK})")


class LockFileError(Exception):
    """``.lock`` is not the plain file a run creates (a link, a folder, a FIFO, a hard link to
    another file); it is never written through."""


class RunLock:
    """An exclusive lock on ``<run_dir>/.lock`` that holds this process's pid.

    A POSIX record lock (``lockf``): the operating system drops it when the process ends, ``kill -9``
    included, so a lock is never stale; and unlike ``flock`` it belongs to the process alone, so
    processes forked while it is held (DataLoader workers, which outlive a killed main process by
    seconds) never hold it. Raises ``RunDirBusy`` when a live process holds it, ``LockFileError``
    when ``.lock`` is not a plain file of its own.

    A record lock ends when its process closes any descriptor of the file, so the holder never
    opens ``.lock`` a second time: a second ``RunLock`` in the same process is refused before it opens.
    """

    _held: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        path = self.run_dir / LOCK
        with contextlib.suppress(FileNotFoundError):
            found = os.lstat(path)
            _check_lock_file(path, found)
            if (found.st_dev, found.st_ino) in RunLock._held:
                raise RunDirBusy(self.run_dir, os.getpid())
        # O_NOFOLLOW: a link planted in place of the lock file is never followed; O_NONBLOCK: a FIFO
        # planted there does not block the open; the checks then apply to what was opened.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            opened = os.fstat(fd)
            _check_lock_file(path, opened)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise RunDirBusy(self.run_dir, _holder(fd)) from None
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._key = fd, (opened.st_dev, opened.st_ino)
        RunLock._held.add(self._key)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            RunLock._held.discard(self._key)
            self._fd = self._key = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_lock_file(path: Path, found: os.stat_result) -> None:
    if stat.S_ISLNK(found.st_mode):
        kind = "a symbolic link"
    elif stat.S_ISDIR(found.st_mode):
        kind = "a folder"
    elif stat.S_ISFIFO(found.st_mode):
        kind = "a FIFO"
    elif not stat.S_ISREG(found.st_mode):
        kind = "not a regular file"
    elif found.st_nlink != 1:
        kind = f"a hard link shared with {found.st_nlink - 1} other name(s)"
    else:
        return
    remove = f"rm -r {path}" if stat.S_ISDIR(found.st_mode) else f"rm {path}"
    raise LockFileError(f"{path} is {kind}; a run's lock file is a plain file the run creates itself and it is "
                        f"never written through anything else: remove it ({remove}) and run again")


def _holder(fd: int) -> int | None:
    """The pid of the process holding the lock on ``fd``'s file, as the kernel reports it (F_GETLK:
    a live process by definition), or None when it is gone or in another pid namespace."""
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        l_type, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


def lock_holder(run_dir: str | Path) -> int | None:
    """The live process holding ``run_dir``'s lock, or None: nothing holds it (the run ended, or its
    process died however it did). Asks the kernel without taking the lock."""
    path = Path(run_dir) / LOCK
    try:
        found = os.lstat(path)
    except OSError:
        return None
    if (found.st_dev, found.st_ino) in RunLock._held:
        return os.getpid()  # opening it again here would drop this process's own lock
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _holder(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)
