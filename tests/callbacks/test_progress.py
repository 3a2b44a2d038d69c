"""How a run shows its progress, seen as a user sees it: `trainer run` with its output piped (a log
file, `| tee`) and in a pseudo-terminal."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import warnings

import pytest
import torch
from torch.nn import functional as F

from helpers import ROOT, Project, classification, mlp
from trainer import Trainer, TrainerConfig
from trainer.callbacks.progress import ProgressLines

# 64 samples in batches of 16: 4 steps an epoch, 2 epochs. Log points every 3 steps (3 and 6), so
# the run ends (step 8) between log points, after its epoch has ended; validation at each epoch end.
PIPED = ("progress=auto", "max_steps=null", "max_epochs=2", "log_every_n_steps=3")


def records(project):
    return [json.loads(line) for line in (project.runs / "t" / "metrics.jsonl").read_text().splitlines()]


def step_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("step ")]


def run_piped(project, *args):
    """`trainer run` with stdout and stderr piped, as under nohup or `| tee`, and Python's default
    buffering (block-buffered stdout): PYTHONUNBUFFERED, which a test runner may set, is dropped."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "trainer", "run", project.config, *args], cwd=project.root,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def piped(shared_run):
    """One piped run of the test project, shared by the tests that read it: the project and what the
    run wrote to stdout and stderr."""

    def make(folder):
        project = Project(folder)
        project.write(project.text)
        proc = run_piped(project, *PIPED)
        assert proc.returncode == 0, proc.stderr
        (folder / "stdout").write_text(proc.stdout)
        (folder / "stderr").write_text(proc.stderr)

    folder = shared_run("progress.piped", make)
    shown = subprocess.CompletedProcess([], 0, (folder / "stdout").read_text(), (folder / "stderr").read_text())
    return Project(folder), shown


def test_piped_output_shows_one_line_per_log_point_and_per_validation(piped):
    project, proc = piped
    lines = step_lines(proc.stdout)
    logged = records(project)
    # The log points at steps 3 and 6, the validations at the end of each epoch and the rest of the
    # interval, flushed when the run ends at step 8: one line each, in the order they happened.
    assert [(r["step"], "val/loss" in r) for r in logged] == [(3, False), (4, True), (6, False), (8, True), (8, False)]
    assert len(lines) == len(logged), proc.stdout
    for line, record in zip(lines, logged):
        assert line.startswith(f"step {record['step']}/8  epoch {record['epoch'] + 1}/2  ")
        if "val/loss" in record:
            assert f"val/loss {record['val/loss']:.4g}" in line and f"val/acc {record['val/acc']:.4g}" in line
        else:
            assert f"loss {record['train/loss']:.4g}" in line and "lr 0.1" in line and line.endswith("samples/s")
    assert "\r" not in proc.stdout + proc.stderr  # no bar drawn into a file


def test_epochs_agree_between_lines_summary_and_metric_files(piped):
    project, proc = piped
    logged = records(project)
    # Counted from 0 in the records: the steps of the second epoch (5 to 8) are epoch 1, the record
    # flushed after that epoch ended included.
    assert [r["epoch"] for r in logged] == [0, 0, 1, 1, 1]
    shown = [int(re.search(r"epoch (\d+)/2", line).group(1)) for line in step_lines(proc.stdout)]
    assert shown == [r["epoch"] + 1 for r in logged]
    summary = proc.stdout.splitlines()[-2]
    assert summary.startswith("finished: step 8, epoch 2/2; "), summary
    csv_epochs = [line.split(",")[1] for line in (project.runs / "t" / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_epochs == ["0", "0", "1", "1", "1"]


def test_lines_reach_the_pipe_as_they_are_written(project):
    """A process killed at step 7 (SIGKILL: nothing is flushed at exit) has already passed on the
    lines of the log points and validation before it; a block-buffered stdout would have lost them."""
    project.write("""\
        import os
        import signal

        from trainer import Callback


        class KillAt(Callback):
            def on_train_batch_end(self, trainer, outputs, batch):
                if trainer.global_step == 7:
                    os.kill(os.getpid(), signal.SIGKILL)
        """, name="killer.py")
    project.write(project.text + "callbacks: [{_target_: killer.KillAt}]\n")
    proc = run_piped(project, *PIPED)
    assert proc.returncode == -9
    assert [line.split("  ")[0] for line in step_lines(proc.stdout)] == ["step 3/8", "step 4/8", "step 6/8"]


def test_progress_off_prints_only_the_summary(project, run_cli):
    proc = run_cli("run", project.config, *PIPED[1:], "progress=off", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("finished: step 8")
    assert len(proc.stdout.splitlines()) == 2 and proc.stderr == ""


def test_deprecated_progress_bar_still_works_and_says_what_to_write(project, run_cli):
    project.write(project.text.replace('progress: "off"', "progress_bar: false"))
    proc = run_cli("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"warning: {project.config}: progress_bar is deprecated: write progress: off instead\n"
    assert not step_lines(proc.stdout)
    config = (project.runs / "t" / "config.yaml").read_text()
    assert "progress: 'off'" in config and "progress_bar" not in config


def run_in_terminal(args, cwd, columns=160):
    """``args`` with stdin, stdout and stderr on a pseudo-terminal of ``columns`` columns (tqdm sizes
    its bar to the terminal; a window of 0 columns would draw nothing); returns all it wrote."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=child, stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child side is closed, the process is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    return out.decode()


def test_in_a_terminal_the_bar_shows_validation_and_its_metrics(project):
    out = run_in_terminal([sys.executable, "-m", "trainer", "run", project.config, "progress=auto",
                           "max_steps=null", "max_epochs=3", "log_every_n_steps=2"], project.root)
    assert not re.search(r"^step \d", out, re.M)  # no lines: the bar instead
    # Validation counts its batches on a bar of its own (32 samples in batches of 16).
    assert re.search(r"validation: +\d+%\|.*\| [012]/2 ", out)
    # What stays on the screen: the bar as drawn last, before the summary.
    final = [part for part in re.split(r"[\r\n]", out.split("finished:")[0]) if "step/s" in part][-1]
    val_loss = records(project)[-1]["val/loss"]
    assert final.startswith("epoch 3/3: 100%"), final
    assert f"val/loss={val_loss:.4g}" in final and "val/acc=" in final and "loss=" in final, final
    assert "finished: step 12, epoch 3/3;" in out


def test_lines_come_from_rank_zero_only(capsys):
    x, y = classification(32)
    model = mlp()
    for main in (True, False):
        t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y),
                    loss_fn=F.cross_entropy, config={"max_steps": 2, "batch_size": 8, "progress": "lines",
                                                     "log_every_n_steps": 1})
        t.is_main_process = main  # what a rank other than 0 has
        t.fit()
        out = capsys.readouterr().out
        assert len(step_lines(out)) == (3 if main else 0), out


def test_a_lines_record_without_a_loss_still_shows_its_step():
    """Every step of the interval skipped for a non-finite loss: the record has no train/loss."""
    shown = ProgressLines()
    shown._steps, shown._epochs = 10, None
    line = shown.line({"step": 4, "epoch": 0, "lr": 0.01, "samples_per_sec": 1234.5})
    assert line == "step 4/10  epoch 1  lr 0.01  1,234 samples/s"


def test_progress_bar_setting_maps_to_progress_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="write progress: off"):
        assert TrainerConfig(progress_bar=False).progress == "off"
    with pytest.warns(DeprecationWarning, match="write progress: auto"):
        assert TrainerConfig(progress_bar=True).progress == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainerConfig().progress == "auto" and TrainerConfig(progress=False).progress == "off"
    with pytest.raises(ValueError, match="disagrees with progress: lines; remove progress_bar"):
        TrainerConfig(progress_bar=False, progress="lines")
