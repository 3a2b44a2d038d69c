import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

# One intra-op thread per process (here and in every subprocess, which inherit it), set before torch
# is imported: the models are tiny, and on a machine of two cores that other processes share (the
# run under test, torchrun's ranks, other work) a second thread spin-waits for its turn. The digits
# run of 30 epochs took 22 s instead of 2 s with two threads at a load of 3, 229 s instead of 46 at 10.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, cwd=None, env=None)``: ``python -m trainer ARGS`` as a user runs it, a real
    process; returns the CompletedProcess (exit code, stdout, stderr). Session-scoped, so that a
    module's shared run can be made with it too."""

    def run(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
        environ = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        environ.update(env or {})
        return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=environ,
                              capture_output=True, text=True, timeout=timeout)

    return run


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
