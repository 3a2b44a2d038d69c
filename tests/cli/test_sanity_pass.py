"""Mistakes that fail as soon as training starts, caught by the sanity pass of ``trainer check`` and
``trainer run`` (exit 2, one line at the config entry, nothing in the run directory); failures of
the user's code later in a run shown as theirs (exit 1, file and line); our own as internal errors."""

import json
from pathlib import Path

import pytest

from helpers import in_process
import trainer as package
from trainer import run_dir as run_files

NOT_DATA = """\
import torch

def features_only():
    return torch.randn(64, 16)  # the labels are missing: a tensor, not a dataset
"""

# Each mistake: the config line changed, and what the one error line must say.
MISTAKES = {
    "shape": ("in_features: 16", "in_features: 20",
              "cfg.yaml:8:3: model: trainer.examples.models.MLP(...) failed on the first training batch: RuntimeError: "
              "mat1 and mat2 shapes cannot be multiplied (16x16 and 20x8); the batch holds inputs of shape (16, 16) "
              "and targets of shape (16,); --debug shows the traceback"),
    "no loss": ("loss: torch.nn.functional.cross_entropy", "",
                "cfg.yaml: no 'loss:' entry, and the default training_step and validation_step of trainer.Trainer "
                "need one: add loss: torch.nn.functional.cross_entropy"),
    "loss class": ("loss: torch.nn.functional.cross_entropy", "loss: torch.nn.CrossEntropyLoss",
                   "cfg.yaml:16:7: loss: torch.nn.CrossEntropyLoss is a class; use {_target_: torch.nn.CrossEntropyLoss} "
                   "to build an instance, or torch.nn.functional.cross_entropy"),
    "monitor": ("loss: torch.nn.functional.cross_entropy",
                "loss: torch.nn.functional.cross_entropy\ncallbacks: [{_target_: trainer.EarlyStopping, monitor: val/accuracy}]",
                "cfg.yaml:17:56: callbacks[0].monitor: trainer.EarlyStopping monitors 'val/accuracy', but validation "
                "reports val/acc, val/loss; did you mean 'val/acc'?"),
    "not data": ("_target_: trainer.examples.synthetic.classification\n  n_train: 64\n  n_val: 32",
                 "_target_: my_data.features_only",
                 "cfg.yaml:13:3: data: my_data.features_only(...) cannot be used: training/validation data must be "
                 "a torch Dataset, a DataLoader or an iterable of batches; got Tensor"),
}


def one_error_line(proc, code=2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_that_fails_at_the_first_step_is_caught_before_it(project, command, mistake):
    old, new, expected = MISTAKES[mistake]
    assert old in project.text
    project.write(NOT_DATA, "my_data.py")
    project.write(project.text.replace(old, new))
    proc = in_process(command, "cfg.yaml", cwd=project.root)
    assert expected in one_error_line(proc)
    assert "config OK" not in proc.stdout
    assert run_files.contents(project.runs / "t") == []  # nothing of the run written, not even its status


def test_check_says_the_sanity_pass_ran_or_was_turned_off(project):
    proc = in_process("check", "cfg.yaml", cwd=project.root)
    assert proc.returncode == 0 and "# sanity pass: one training and one validation batch went through" in proc.stdout
    project.write(project.text.replace("in_features: 16", "in_features: 20"))
    proc = in_process("check", "cfg.yaml", "sanity_check=false", cwd=project.root)
    assert proc.returncode == 0 and "# sanity pass: off (sanity_check: false)" in proc.stdout


FAILS_AT_STEP_3 = """\
from trainer import Trainer


class MyTrainer(Trainer):
    def training_step(self, batch):
        if self.global_step == 2:
            raise RuntimeError("the third batch is bad")
        return super().training_step(batch)
"""


def test_the_users_error_during_a_run_is_shown_as_theirs(project):
    project.write(FAILS_AT_STEP_3, "my_trainer.py")
    project.write("trainer: my_trainer.MyTrainer\n" + project.text)
    proc = in_process("run", "cfg.yaml", cwd=project.root)
    line = one_error_line(proc, code=1)
    assert line == ("error: the run failed after 2 optimizer steps: RuntimeError: the third batch is bad, raised in "
                    "my_trainer.py:7 in training_step; --debug shows the traceback")
    status = json.loads((project.runs / "t" / run_files.STATUS).read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: the third batch is bad"

    proc = in_process("run", "cfg.yaml", "--debug", cwd=project.root)  # the failed run is replaced
    assert proc.returncode == 1 and "Traceback" in proc.stderr and 'my_trainer.py", line 7' in proc.stderr


def test_our_own_bug_stays_an_internal_error(project):
    # A function whose code claims a file of the trainer package: what a bug of ours looks like in a
    # traceback, without changing the package.
    ours = Path(package.__file__).parent / "callbacks.py"
    project.write(f"""\
        from trainer import Callback

        scope = {{}}
        exec(compile("def bug(trainer):\\n    return trainer.no_such_attribute\\n", {str(ours)!r}, "exec"), scope)


        class CallsOurs(Callback):
            def on_train_batch_end(self, trainer, outputs, batch):
                if trainer.global_step == 2:
                    scope["bug"](trainer)
        """, "calls_ours.py")
    project.write(project.text + "callbacks: [{_target_: calls_ours.CallsOurs}]\n")
    proc = in_process("run", "cfg.yaml", cwd=project.root)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "internal error (exit 1)" in proc.stderr and "please report it" in proc.stderr
    assert json.loads((project.runs / "t" / run_files.STATUS).read_text())["status"] == "failed"
