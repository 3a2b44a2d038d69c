"""What ``trainer run`` may do to the folders it is given: run names that stay inside out_dir,
``--overwrite`` that deletes only a run, a lock held by the live run, leftovers of killed saves,
the machine's conditions as one line and exit 2, a finished run left alone and a failed one replaced.
Real files, real mounts where a full or read-only disk is needed, a real live run to hold its lock; the
command under test runs in this process (``in_process``: the same code path, no interpreter start)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import Project, in_process, process_env
from trainer import run_dir as run_files


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (links as their target), to show that nothing changed;
    lock files aside, which hold the pid of whichever process looked last."""
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if (p.is_file() or p.is_symlink()) and p.name != run_files.LOCK}


def one_error_line(proc) -> str:
    """The stderr of a user error: exactly one line, 'error: ...', and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    return lines[0]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / run_files.METRICS_JSONL).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The test project's run ``t`` as ``trainer run`` leaves it: finished at step 4, with its final
    checkpoint. Made once for the module; ``copy_finished`` gives a test its own copy."""
    project = Project(tmp_path_factory.mktemp("finished"))
    project.write(project.text)
    proc = in_process("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    return project.runs / "t"


def copy_finished(finished_run: Path, to: Path) -> Path:
    """A copy of the finished run at ``to`` (the run directory holds no absolute path: out_dir is runs)."""
    shutil.copytree(finished_run, to, symlinks=True)
    return to


# ------------------------------------------------------------------ names stay inside out_dir


@pytest.mark.parametrize("name", ["..", ".", "../../x", "a/b", "a\\\\b", "x" * 101, "\U0001F600" * 26, "a\\0b",
                                  "a\\nb"])
def test_a_name_that_is_not_one_folder_is_refused_at_its_line(project, name):
    # A name that reaches outside out_dir (or that no file system takes) is a config error at its
    # line, before any folder is touched, --overwrite or not.
    project.write(f'name: "{name}"\n' + project.text.replace("name: t\n", ""))
    (project.root / "keep.txt").write_text("the user's file")
    before = snapshot(project.root)
    line = one_error_line(in_process("run", project.config, "--overwrite", cwd=project.root))
    assert line.startswith(f"error: {project.config}:1:7: name: ")
    assert snapshot(project.root) == before


def test_dot_dot_with_overwrite_leaves_the_project_folder(project, finished_run):
    (project.root / "my_model.py").write_text("# the user's code\n")
    copy_finished(finished_run, project.runs / "t")
    before = snapshot(project.root)
    line = one_error_line(in_process("run", project.config, "name=..", "--overwrite", cwd=project.root))
    assert "command line 'name=..': name: '..' is not a folder of its own" in line
    assert snapshot(project.root) == before


def test_dot_with_overwrite_leaves_the_other_runs(project):
    for name in ("a", "b"):
        assert in_process("run", project.config, f"name={name}", cwd=project.root).returncode == 0
    before = snapshot(project.runs)
    one_error_line(in_process("run", project.config, "name=.", "--overwrite", cwd=project.root))
    assert snapshot(project.runs) == before


@pytest.mark.parametrize("name", ["../../outside", "/ABSOLUTE"])
def test_a_name_never_writes_outside_out_dir(tmp_path, project, name):
    name = name.replace("/ABSOLUTE", str(tmp_path / "absolute"))
    one_error_line(in_process("run", project.config, f"name={name}", cwd=project.root))
    assert not (tmp_path.parent / "outside").exists() and not (tmp_path / "absolute").exists()
    assert not project.runs.exists()


def test_the_longest_name_allowed_makes_a_run(project):
    name = "n" * run_files.NAME_MAX_BYTES
    proc = in_process("run", project.config, f"name={name}", "max_steps=1", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert (project.runs / name / run_files.CONFIG).is_file()


# ------------------------------------------------------------------ --overwrite deletes a run, and only a run


def test_overwrite_replaces_only_the_run_it_names(project, finished_run):
    copy_finished(finished_run, project.runs / "t")
    assert in_process("run", project.config, "name=other", cwd=project.root).returncode == 0
    (project.runs / "notes.txt").write_text("beside the runs")
    others = {k: v for k, v in snapshot(project.runs).items() if not k.startswith("t/")}
    proc = in_process("run", project.config, "--overwrite", "max_steps=2", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in records(project.runs / "t") if "train/loss" in r] == [2]
    assert sorted(p.name for p in (project.runs / "t" / "checkpoints").iterdir()) == ["step-00000002.pt"]
    assert {k: v for k, v in snapshot(project.runs).items() if not k.startswith("t/")} == others


@pytest.mark.parametrize("flags", [["--overwrite"], [], ["--resume", "auto"]])
def test_a_folder_that_is_not_a_run_is_left_alone(project, flags):
    folder = project.runs / "t"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "x.csv").write_text("1,2\n")
    before = snapshot(folder)
    line = one_error_line(in_process("run", project.config, *flags, cwd=project.root))
    assert "runs/t holds files that are not a run's (none of config.yaml, status.json, metrics.jsonl, checkpoints/)" in line and "pick another name=" in line
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["data", "thesis.tex"]


@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume", "auto"]])
def test_a_run_directory_that_is_a_link_is_refused(tmp_path, project, flags, finished_run):
    # The link points at a real run elsewhere: --overwrite through it would empty that run.
    elsewhere = tmp_path / "elsewhere"
    copy_finished(finished_run, elsewhere / "t")
    project.runs.mkdir()
    (project.runs / "t").symlink_to(elsewhere / "t")
    before = snapshot(elsewhere)
    line = one_error_line(in_process("run", project.config, *flags, cwd=project.root))
    assert "runs/t is a symbolic link; a run directory is a real folder in runs" in line
    assert snapshot(elsewhere) == before


def test_overwrite_and_resume_together_are_refused(project, finished_run):
    copy_finished(finished_run, project.runs / "t")
    before = snapshot(project.runs)
    line = one_error_line(in_process("run", project.config, "--overwrite", "--resume", "auto", cwd=project.root))
    assert "pass one of the two" in line
    assert snapshot(project.runs) == before


# ------------------------------------------------------------------ a live run holds its directory


SLOW = """\
import time


class Slow:
    \"\"\"Sleeps after every step, so that a run lasts long enough to meet a second one.\"\"\"

    def on_train_batch_end(self, trainer, outputs, batch):
        time.sleep(0.05)
"""


def start_slow_run(project) -> subprocess.Popen:
    project.write(SLOW, "slow.py")
    cfg = project.write(project.text.replace("max_steps: 4", "max_steps: 100000")
                        + "callbacks: [{_target_: slow.Slow}]\n", "slow.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(cfg)], cwd=project.root, env=process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = project.runs / "t" / run_files.STATUS
    deadline = time.monotonic() + 120
    while not (status.exists() and json.loads(status.read_text()).get("status") == "running"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the slow run did not start: {proc.communicate()}")
        time.sleep(0.1)
    return proc


def test_a_second_process_on_a_live_run_is_refused_and_kill_9_frees_it(project):
    first = start_slow_run(project)
    run_dir = project.runs / "t"
    shown = Path("runs", "t")  # as the command line names it, relative to the project folder
    try:
        assert run_files.lock_holder(run_dir) == first.pid
        assert (run_dir / run_files.LOCK).read_text().strip() == str(first.pid)
        for flags in ([], ["--resume", "auto"], ["--overwrite"]):
            line = one_error_line(in_process("run", project.config, *flags, cwd=project.root))
            assert f"{shown} is in use by a live run (process {first.pid}, see {shown / '.lock'})" in line, flags
            assert first.poll() is None  # the live run goes on, its directory in place
            assert (run_dir / run_files.CONFIG).is_file() and (run_dir / run_files.STATUS).is_file()
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert run_files.lock_holder(run_dir) is None  # the operating system dropped it with the process
    # It died before its first checkpoint: a new run of the name takes its place without --overwrite.
    proc = in_process("run", project.config, "max_steps=2", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert f"{shown}: replacing an earlier run whose process ended before its first checkpoint" in proc.stdout
    assert [r["step"] for r in records(run_dir) if "train/loss" in r] == [2]


def test_overwrite_with_a_config_that_fails_its_checks_keeps_the_earlier_run(project, finished_run):
    # --overwrite replaces a run once the new config has passed every check: a mistake in it
    # (here a model that cannot be built, then one whose sanity pass fails) loses nothing.
    run_dir = copy_finished(finished_run, project.runs / "t")
    kept = snapshot(run_dir)
    for mistake in ("model._target_=no_such_module.Net", "loss=torch.nn.functional.mse_loss"):
        proc = in_process("run", project.config, "--overwrite", mistake, cwd=project.root)
        assert proc.returncode == 2, proc.stderr
        assert snapshot(run_dir) == kept, mistake
    proc = in_process("run", project.config, "--overwrite", "max_steps=2", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in records(run_dir) if "train/loss" in r] == [2]  # the earlier run's records are gone


# ------------------------------------------------------------------ leftovers of killed saves


def test_temp_files_of_killed_saves_go_at_the_next_start(project, finished_run):
    run_dir = copy_finished(finished_run, project.runs / "t")
    checkpoints = run_dir / "checkpoints"
    kept = snapshot(checkpoints)
    leftovers = [checkpoints / ".step-00000005.pt.tmp-4242", checkpoints / ".best.pt.tmp-4242",
                 run_dir / ".status.json.tmp", run_dir / ".config.yaml.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    sharded = checkpoints / ".step-00000005.tmp"
    sharded.mkdir()
    (sharded / "__0_0.distcp").write_bytes(b"half a shard")
    proc = in_process("run", project.config, "--resume", "auto", "max_steps=6", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in [*leftovers, sharded])
    assert {k: v for k, v in snapshot(checkpoints).items() if k in kept} == kept
    assert [p.name for p in run_files.list_checkpoints(checkpoints)] == ["step-00000004.pt", "step-00000006.pt"]


# ------------------------------------------------------------------ the machine's conditions: one line, exit 2


def test_out_dir_that_is_a_file(project):
    project.runs.write_text("not a folder")
    line = one_error_line(in_process("run", project.config, cwd=project.root))
    assert line == "error: out_dir runs is a file, not a folder; set out_dir= to a folder for runs"
    assert project.runs.read_text() == "not a folder"


def test_out_dir_under_a_file_cannot_be_written(project):
    line = one_error_line(in_process("run", project.config, "out_dir=cfg.yaml/runs", cwd=project.root))
    assert "cannot write cfg.yaml/runs" in line and "Not a directory" in line and "set out_dir=" in line


def fill(folder: Path) -> None:
    """Write until the file system is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC


def test_a_read_only_out_dir(project, mount_tmpfs):
    read_only = mount_tmpfs("64k", read_only=True)
    line = one_error_line(in_process("run", project.config, f"out_dir={read_only}", cwd=project.root))
    assert f"cannot write {read_only / 't'}: Read-only file system; set out_dir= to a folder you can write" in line


def test_a_full_disk_at_start(project, mount_tmpfs):
    disk = mount_tmpfs("256k")
    fill(disk)
    line = one_error_line(in_process("run", project.config, f"out_dir={disk}", cwd=project.root))
    assert "No space left on device; free some space, or set out_dir= to another disk" in line


def test_a_full_disk_at_a_resume_keeps_the_run(project, mount_tmpfs):
    disk = mount_tmpfs("1m")
    assert in_process("run", project.config, f"out_dir={disk}", cwd=project.root).returncode == 0
    before = snapshot(disk / "t")
    fill(disk)
    line = one_error_line(in_process("run", project.config, f"out_dir={disk}", "max_steps=8", "--resume", "auto",
                                  cwd=project.root))
    assert "No space left on device" in line
    assert snapshot(disk / "t") == before


# ------------------------------------------------------------------ finished runs, failed runs


def test_resume_auto_of_a_finished_run_adds_nothing(project, finished_run):
    run_dir = copy_finished(finished_run, project.runs / "t")
    before = snapshot(run_dir)
    for limits in ([], ["max_steps=3"]):  # the same limits, or limits already reached
        proc = in_process("run", project.config, "--resume", "auto", *limits, cwd=project.root)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == ("runs/t: the run finished at step 4 and its newest checkpoint is the "
                                       "final one; nothing to continue (raise max_steps or max_epochs to train "
                                       "further)")
        assert snapshot(run_dir) == before


def test_resume_auto_of_a_finished_run_with_raised_limits_continues(project, finished_run):
    run_dir = copy_finished(finished_run, project.runs / "t")
    proc = in_process("run", project.config, "--resume", "auto", "max_steps=6", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert "finished: step 6" in proc.stdout
    steps = [r["step"] for r in records(run_dir) if "train/loss" in r]
    assert steps == [2, 4, 6]


FAIL = """\
class FailAt:
    \"\"\"Raises once the run reaches ``step``: a run that fails.\"\"\"

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, outputs, batch):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"failed at step {trainer.global_step}")
"""


def test_a_run_that_failed_before_its_first_checkpoint_is_replaced(project):
    project.write(FAIL, "fail.py")
    failing = project.write(project.text + "callbacks: [{_target_: fail.FailAt, step: 2}]\n", "failing.yaml")
    assert in_process("run", failing, cwd=project.root).returncode == 1
    run_dir = project.runs / "t"
    assert json.loads((run_dir / run_files.STATUS).read_text())["status"] == "failed"
    proc = in_process("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert "runs/t: replacing an earlier run that failed before its first checkpoint" in proc.stdout
    assert [r["step"] for r in records(run_dir) if "train/loss" in r] == [2, 4]
    assert json.loads((run_dir / run_files.STATUS).read_text())["status"] == "finished"


def test_a_failed_run_with_a_checkpoint_is_kept(project):
    project.write(FAIL, "fail.py")
    failing = project.write(project.text + "checkpoint: {every_n_steps: 1}\n"
                            "callbacks: [{_target_: fail.FailAt, step: 3}]\n", "failing.yaml")
    assert in_process("run", failing, cwd=project.root).returncode == 1
    before = snapshot(project.runs)
    line = one_error_line(in_process("run", project.config, cwd=project.root))
    assert "already holds a run; continue it with --resume auto" in line
    assert snapshot(project.runs) == before


def test_the_config_is_checked_before_the_run_name(project, finished_run):
    copy_finished(finished_run, project.runs / "t")
    before = snapshot(project.runs)
    line = one_error_line(in_process("run", project.config, "optimizer.lr=abc", cwd=project.root))
    assert "optimizer.lr: torch.optim.SGD expects" in line
    line = one_error_line(in_process("run", project.config, cwd=project.root))
    assert "already holds a run" in line
    assert snapshot(project.runs) == before


@pytest.mark.parametrize("model", [[], ["model.hidden=4096", "model.depth=1"]], ids=["small-records", "large-tensor"])
@pytest.mark.parametrize("background", [False, True])
def test_a_disk_that_fills_during_a_run_says_so_and_keeps_the_last_checkpoint(project, mount_tmpfs, background,
                                                                              model):
    # With room for a log line and none for a checkpoint, the write fails in a small record (the project's
    # model), where torch.save passes the OSError on, or in a tensor's record larger than the room left
    # (a 16 x 4096 weight), which torch.save reports as "[enforce fail at inline_container.cc:672] .
    # unexpected pos ...".
    disk = mount_tmpfs("1m")
    marker = project.root / "filled"
    # No final save: with one, a slow background write would add a (timing-dependent) warning line.
    cfg = project.write(project.text + f"out_dir: {disk}\ncheckpoint: {{every_n_steps: 2, save_final: false, "
                        f"async: {str(background).lower()}}}\n"
                        f"callbacks:\n  - {{_target_: disks.FillDisk, step: 3, marker: '{marker}', leave: 8192}}\n")
    proc = in_process("run", cfg, "max_steps=5", *model, cwd=project.root)
    folder = disk / "t" / "checkpoints"
    last = folder / "step-00000002.pt"
    assert marker.exists() and sorted(p.name for p in folder.iterdir()) == [last.name]  # no temp file left
    if background:
        # The loop goes on while the write fails; its own next write to the full disk (a metric record)
        # may fail first and end the run. The background write's failure is then said beside it.
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("error: ") and len(lines) <= 2, proc.stderr
        assert "No space left on device" in lines[-1], proc.stderr
        line = next(x for x in lines if "could not write checkpoint" in x).removeprefix("trainer: ")
        line = line if line.startswith("error: ") else f"error: {line}"
    else:
        line = one_error_line(proc)
    prefix = "error: checkpoint.async: the background write of step 4 failed: " if background else "error: "
    assert line.startswith(f"{prefix}could not write checkpoint {folder / 'step-00000004.pt'}: No space left on "
                           f"device in {folder} (")
    assert (f"a checkpoint of this run needs about {last.stat().st_size / 2**10:.1f} KiB, the size of {last.name}). "
            f"The partial file is removed and the last complete checkpoint is {last} (step 2), intact: free space "
            "on that disk, then continue with --resume auto") in line
    assert "enforce fail" not in line

    (disk / "filler").unlink()
    resumed = in_process("run", cfg, "max_steps=5", *model, "--resume", "auto", cwd=project.root)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: continuing from {last} (step 2)" in resumed.stdout
