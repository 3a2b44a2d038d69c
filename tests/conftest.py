import ast
import functools
import gc
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from filelock import FileLock

# One intra-op thread per process (here and in every subprocess, which inherit it), set before torch
# is imported: the models are tiny, and on a machine of two cores that other processes share (the
# run under test, torchrun's ranks, other work) a second thread spin-waits for its turn. The digits
# run of 30 epochs took 22 s instead of 2 s with two threads at a load of 3, 229 s instead of 46 at 10.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

from helpers import ROOT, Project  # noqa: E402

TESTS = ROOT / "tests"


# ------------------------------------------------------------------ the `process` marker
#
# A test is a process test when its own code, a fixture it uses, or a function of its module or of
# helpers.py that it calls (followed through calls) starts a process or sends a signal. Found by
# reading that code at collection, so that `-m "not process"` can leave such tests out; checked
# while the tests run (below), so that a test the reading missed fails and says so.

PROCESS_CODE = re.compile(r"\bsubprocess\b|\bPopen\b|\bos\.(kill|killpg|fork|forkpty|system|posix_spawn)\b|"
                          r"\bmultiprocessing\b|\bpty\b|torch\.distributed\.run|\brun_cli\b")
PROCESS_FIXTURES = {"run_cli", "mount_tmpfs"}


_FOUND: dict = {}  # code object -> whether it starts processes, so that each function is read once


def _starts_processes(function) -> bool:
    """Whether ``function``, or a function of its own module or of helpers.py that it names, starts one."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    if code not in _FOUND:
        _FOUND[code] = False  # while it is read: a function that calls itself
        _FOUND[code] = _reads_as_starting(function, code)
    return _FOUND[code]


def _reads_as_starting(function, code) -> bool:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):  # the code, without docstrings, decorators (parameters) and, unparsed, comments
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            node.decorator_list = []
            if ast.get_docstring(node):
                node.body = node.body[1:] or [ast.Pass()]
    if PROCESS_CODE.search(ast.unparse(tree)):
        return True
    names, stack = set(), [code]
    while stack:  # the names the function and the functions nested in it use
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if inspect.iscode(c))
    scope = function.__globals__
    return any(inspect.isfunction(scope.get(name)) and scope[name].__module__ in (function.__module__, "helpers")
               and _starts_processes(scope[name]) for name in names)


def _is_process_test(item) -> bool:
    if item.get_closest_marker("distributed"):
        return True
    if PROCESS_FIXTURES & set(item.fixturenames):
        return True
    fixtures = [d.func for name in item.fixturenames for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
    return any(_starts_processes(function) for function in [item.obj, *fixtures])


def pytest_collection_modifyitems(config, items):
    skip_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if skip_cuda and item.get_closest_marker("cuda"):
            item.add_marker(skip_cuda)
        if _is_process_test(item):
            item.add_marker(pytest.mark.process)
    # The long tests first (torchrun, then other slow ones, then other processes), each kind in the
    # modules' order: in parallel, the workers share the long tests early and the short ones fill the end.
    items.sort(key=lambda item: tuple(item.get_closest_marker(m) is None for m in ("process", "distributed", "slow")))


def pytest_collection_finish(session):
    # What collection imported (torch, MLflow, W&B, torchmetrics, the test modules: half a million
    # objects) lives until the end; frozen, the collector stops scanning it. Each command run in
    # process ends as the CLI does, with gc.collect() and gc.get_objects() (trainer.cli.commands.release):
    # 0.3 s over the whole heap, 0.02 s over what the tests made since.
    gc.freeze()


# The check: a test that starts a process (or sends a signal) from its own code, from a fixture or
# from helpers.py must be marked `process`. A process started by a library the test uses (a
# DataLoader's workers, W&B's service) is the library's, not the test's.

_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


class _Starts:
    item = None  # the test running now, if it is not marked `process`
    started: list = []


def _watch(owner, name: str) -> None:
    """Wrap ``owner.name`` (os.fork, subprocess.Popen._execute_child, ...) so that a call made by the code
    of the tests while an unmarked test runs is noted. (Not an audit hook: one that runs Python code
    inside a compiled region counts as frames torch.compile compiles.)"""
    original = getattr(owner, name)

    @functools.wraps(original)
    def watched(*args, **kwargs):
        if _Starts.item is not None:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_STDLIB):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(str(TESTS)):
                where = Path(frame.f_code.co_filename).relative_to(TESTS)
                _Starts.started.append(f"{name} at {where}:{frame.f_lineno}")
        return original(*args, **kwargs)

    setattr(owner, name, watched)


# (Not os.system: a test pickles it, and a wrapper is not the object pickle finds as posix.system.)
for _name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "kill", "killpg"):
    _watch(os, _name)
_watch(subprocess.Popen, "_execute_child")
_watch(signal, "pthread_kill")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _Starts.item = None if item.get_closest_marker("process") else item
    _Starts.started = []
    yield
    _Starts.item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown" and _Starts.item is item and _Starts.started and report.passed:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} starts a process or sends a signal ({'; '.join(_Starts.started[:3])}) "
                           "but was not marked `process`: tests/conftest.py finds these by reading the test, its "
                           "fixtures and the functions it calls; make the start visible there (a fixture or a "
                           "function of the module or of helpers.py), or use the run_cli fixture")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, cwd=None, env=None, session=False)``: ``python -m trainer ARGS`` as a user runs
    it, a real process (with ``session``, leading a process group of its own, for a signal sent to
    the group); returns the CompletedProcess (exit code, stdout, stderr). For what only a real process
    shows: its exit status, signals, a kill, a second process, Python's own warning lines. Anything
    else runs in this process, through ``helpers.in_process`` (the same code path, no interpreter
    start). Session-scoped, so that a module's shared run can be made with it too."""

    def run(*args, cwd=None, env=None, timeout=300, session=False) -> subprocess.CompletedProcess:
        environ = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        environ.update(env or {})
        return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=environ,
                              capture_output=True, text=True, timeout=timeout, start_new_session=session)

    return run


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """``shared_run(name, make)``: the folder ``name`` that ``make(folder)`` fills (a reference run, say),
    made once for the whole session: under pytest-xdist the first worker to ask makes it and the
    others wait for it and read it. A run that several tests compare against is made once, wherever
    those tests run. The tests only read it (copy it first to change it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, shared by its workers
    shared = base / "shared"
    shared.mkdir(exist_ok=True)

    def get(name: str, make) -> Path:
        folder, done = shared / name, shared / f"{name}.done"
        with FileLock(shared / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a make that failed left
                folder.mkdir()
                make(folder)
                done.touch()
        return folder

    return get


@pytest.fixture
def project(tmp_path) -> Project:
    """A small user project in ``tmp_path``: ``cfg.yaml`` written from ``Project.text``."""
    made = Project(tmp_path)
    made.write(made.text)
    return made


@pytest.fixture
def offline_trackers(monkeypatch):
    """MLflow and W&B as the tests use them, whatever this machine's environment says: W&B offline
    and silent, both writing under the run directory (no WANDB_* or MLFLOW_* setting of the machine
    reaches them)."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "MLFLOW_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(size, read_only=False, at=None)``: a fresh tmpfs of ``size`` (e.g. '256k') mounted
    at ``at`` (made with its parents) or in ``tmp_path``: a real small, full or read-only file system.
    Skips where this process may not mount one; unmounted after the test."""
    mounted = []

    def mount(size: str, read_only: bool = False, at: Path | None = None) -> Path:
        point = at if at is not None else tmp_path / f"fs{len(mounted)}"
        point.mkdir(parents=True)
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root in a namespace that allows mounts): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
