"""Small models and data shared by the tests, and the paths and checks the process tests use."""

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import textwrap
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# The scripts and modules that tests run as processes, or name in a config (killers.KillAt, ...).
PROJECT = ROOT / "tests" / "project"


# A tiny MLP on synthetic data, four SGD steps; runs go to the default out_dir, runs/, beside it.
PROJECT_CONFIG = """\
name: t
seed: 0
max_steps: 4
batch_size: 16
progress: "off"
log_every_n_steps: 2
model:
  _target_: trainer.examples.models.MLP
  in_features: 16
  out_features: 4
  hidden: 8
data:
  _target_: trainer.examples.synthetic.classification
  n_train: 64
  n_val: 32
loss: torch.nn.functional.cross_entropy
optimizer:
  _target_: torch.optim.SGD
  lr: 0.1
"""


def project_config(*bases: dict, **changes) -> str:
    """PROJECT_CONFIG with the changes of each of ``bases``, then of ``changes``, made in turn: a value
    sets a top-level key, None removes it, and a mapping is merged into the key's mapping
    (``model={"hidden": 32}`` changes one argument of the model), unless it names another
    ``_target_``, which replaces the component. Written as YAML with each component on one line:
    ``model: {_target_: trainer.examples.models.MLP, in_features: 16, out_features: 4, hidden: 32}``."""
    config = yaml.safe_load(PROJECT_CONFIG)
    for layer in (*bases, changes):
        for key, value in layer.items():
            old = config.get(key)
            if value is None:
                config.pop(key, None)
            elif isinstance(value, dict) and isinstance(old, dict) and value.get("_target_", old.get("_target_")) == \
                    old.get("_target_"):
                config[key] = {**old, **value}
            else:
                config[key] = value
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=1000)


# project_config's changes for a run that draws from every random generator (killers.NoisyTrainer, dropout):
# 18 steps in three epochs, a log point every 4 steps, validation every epoch, a checkpoint every 5.
NOISY = dict(name="r", trainer="killers.NoisyTrainer", seed=5, max_steps=None, max_epochs=3, log_every_n_steps=4,
             eval_every_n_epochs=1, checkpoint={"every_n_steps": 5, "keep_last": 10},
             model={"hidden": 16, "dropout": 0.2}, data={"n_train": 96},
             optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-2})


@dataclass
class Project:
    """A user's project folder: ``cfg.yaml`` (``text``), its own modules beside it, ``runs/``."""

    root: Path
    text: str = PROJECT_CONFIG

    @property
    def config(self) -> Path:
        return self.root / "cfg.yaml"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def write(self, text: str, name: str = "cfg.yaml") -> Path:
        """Write a file of the project (dedented) and return its path."""
        path = self.root / name
        path.write_text(textwrap.dedent(text))
        return path


def mlp(seed: int = 0, sizes=(8, 16, 3), dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def batches(n: int, size: int, seed: int = 1, features: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, features, generator=g)
        y = torch.randint(0, classes, (size,), generator=g)
        out.append((x, y))
    return out


def classification(n: int = 96, seed: int = 1, features: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, :classes].argmax(dim=1)).long()
    return x, y


class Rows(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset: the rows of ``x`` and ``y`` (the Trainer's
    DataLoader path)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def quiet(**overrides):
    """A TrainerConfig dict with the progress bar off and logging every step."""
    cfg = {"progress": "off", "log_every_n_steps": 1}
    cfg.update(overrides)
    return cfg


def project_module(name: str):
    """The module ``name`` of tests/project (killers, fsdp_script, ...), imported in this process;
    sys.path is left as it was."""
    sys.path.insert(0, str(PROJECT))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(PROJECT))


def process_env(**extra) -> dict:
    """The environment of a process a test starts: this checkout and tests/project/ importable."""
    path = os.pathsep.join([str(ROOT), str(PROJECT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def workers_config(folder: Path, name: str = "w", data: dict | None = None, **settings) -> Path:
    """``folder/<name>.yaml``: a run whose training data DataLoader workers read (tests/project/workers.py's
    ``data``, given ``data``'s arguments), for runs signalled and killed as schedulers do; ``settings``
    go over its top-level defaults."""
    config = {"name": name, "out_dir": str(folder / "runs"), "batch_size": 4, "num_workers": 2, "progress": "off",
              "eval_every_n_epochs": None,
              "model": {"_target_": "torch.nn.Linear", "in_features": 8, "out_features": 3},
              "data": {"_target_": "workers.data", **(data or {})},
              "loss": "torch.nn.functional.cross_entropy",
              "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}, **settings}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    return path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's ranks, their DataLoader workers), read from /proc."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                queue += children
    return found


def run_or_stacks(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` that, should the job hang, fails with the Python stacks of every process
    under it (SIGABRT with PYTHONFAULTHANDLER set) instead of a bare timeout."""
    env = {**(kwargs.pop("env", None) or process_env()), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(5)  # the stacks are written; then whatever is left goes
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} did not end within {timeout} s; what it printed and every process's "
                             f"stacks:\n{out[-4000:]}\n{err[-20000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait_until_stuck(marker, proc):
    """Until the loop waits for a batch that never comes: the data worker is stuck (it touches
    ``marker`` as it starts to hang) and the main thread has used up the batches the worker made
    before (it sleeps, its CPU time unchanged). The worker runs ahead of the loop: on a loaded machine
    a signal sent at the marker alone could reach a loop that still has a step to take, and that
    stops it at that step's boundary, not at the second signal."""
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the worker never got stuck"
        time.sleep(0.1)
    stat = Path(f"/proc/{proc.pid}/task/{proc.pid}/stat")  # the main thread
    if not stat.exists():
        return
    before = None
    while True:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        now = (fields[0], int(fields[11]) + int(fields[12]))  # state; utime + stime of the main thread
        if now[0] == "S" and now == before:
            return
        assert time.monotonic() < deadline and proc.poll() is None, "the loop never waited for the stuck worker"
        before = now
        time.sleep(0.3)


def loopback_ok() -> bool:
    """Whether processes on this machine can open loopback sockets to each other (torchrun needs it)."""
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            a.listen(1)
            b.connect(a.getsockname())
        return True
    except OSError:
        return False


@contextlib.contextmanager
def reserved_port():
    """A free loopback port, held for the block: bound with SO_REUSEADDR and not listening, so that a
    server that sets SO_REUSEADDR too (torch's TCPStore) listens on it while no other socket is given
    it meanwhile. (A port found free and then released could be taken before the server starts.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_conversions():
    """Counts every tensor-to-host conversion (a host sync on a GPU) made inside the block, by name."""
    counts = {name: 0 for name in CONVERSIONS}
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def assert_tensors_equal(a, b, path="state"):
    """``a`` and ``b`` (tensors, or dicts, lists and tuples of them and of plain values) are equal bit
    for bit, dtypes included; the message names the first path where they differ."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@dataclass
class Result:
    """What ``in_process`` returns: the fields of a CompletedProcess that the tests read."""

    returncode: int
    stdout: str
    stderr: str
    output: str  # stdout and stderr interleaved, as a terminal shows them


def in_process(*args, cwd=None, env=None) -> Result:
    """``trainer ARGS`` run in this process: the command's entry point (``trainer.cli.main``) with its
    output captured by typer's CliRunner, without an interpreter start. ``cwd`` is the folder it runs
    in (its modules importable, as ``python -m`` makes them), ``env`` variables set for the call;
    tests/project is importable, as ``process_env`` makes it for a process. Warnings reach stderr as
    in a process of its own (Python's default filters), not pytest's summary. Afterwards the folder,
    sys.argv, sys.path, the variables and the modules imported from the user's folder are as they
    were, so that the next call's ``my_model.py`` is its own.

    What needs the real process stays with the ``run_cli`` fixture: exit statuses after a signal or a
    kill, a second process, what the interpreter itself does (imports at start, ``-W``)."""
    from typer.testing import CliRunner

    from trainer.cli import main
    from trainer.data.workers import LEFT_TO_MAIN

    saved_cwd, saved_argv, saved_path, saved_modules = os.getcwd(), sys.argv, list(sys.path), set(sys.modules)
    saved_handlers = {signum: signal.getsignal(signum) for signum in LEFT_TO_MAIN}  # main() holds them at its end
    saved_env = {name: os.environ.get(name) for name in env or {}}
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update({name: str(value) for name, value in (env or {}).items()})
        sys.path.insert(0, str(PROJECT))
        sys.argv = ["trainer", *map(str, args)]
        importlib.invalidate_caches()  # files written since the last import in a folder already on sys.path
        with CliRunner().isolation() as (stdout, stderr, output), warnings.catch_warnings():
            _python_warning_defaults()
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            except Exception:  # what Python prints for an exception nothing caught, as the process would
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            captured = [stream.getvalue().decode() for stream in (stdout, stderr, output)]
    finally:
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        sys.path[:] = saved_path
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name in set(sys.modules) - saved_modules:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file and not file.startswith((sys.prefix, sys.base_prefix, str(ROOT))):
                del sys.modules[name]  # the user's own module, from the folder the command ran in
    return Result(code, *captured)


def _python_warning_defaults() -> None:
    """Inside ``warnings.catch_warnings()``: the filters of a Python process started without -W, and
    warnings printed to the current sys.stderr in Python's own form (pytest would record them)."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category, append=True)

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def invoke(*args) -> tuple[int, str]:
    """``trainer ARGS`` in this process (``in_process``): the exit code and the output."""
    result = in_process(*args)
    return result.returncode, result.output
