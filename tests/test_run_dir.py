import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from helpers import classification, in_process, mlp, process_env, quiet
from trainer import Callback, Trainer, TrainerConfig
from trainer import run_dir as run_files


@pytest.mark.parametrize("name", [".step-00000100.pt.tmp-4242", ".step-00000100.tmp", ".best.pt.tmp-4242",
                                  ".best.tmp-4242", ".status.json.tmp", ".config.yaml.tmp"])
def test_what_killed_saves_leave_is_a_temp_name(name):
    assert run_files.TEMP_NAME.match(name)


@pytest.mark.parametrize("name", ["step-00000100.pt", "step-00000100", "best.pt", "best",
                                  "best-step-00000100-val_loss=0.1234.pt", run_files.LOCK, run_files.STATUS,
                                  "notes.tmp"])
def test_files_a_run_keeps_are_not_temp_names(name):
    assert not run_files.TEMP_NAME.match(name)


def test_a_second_lock_on_a_run_directory_is_refused_until_the_first_is_released(tmp_path):
    # The same process counts as another holder (and its first lock stays held: a record lock would
    # end if the process opened and closed the file again).
    with run_files.RunLock(tmp_path):
        with pytest.raises(run_files.RunDirBusy) as busy:
            run_files.RunLock(tmp_path)
        assert busy.value.pid == os.getpid()
        assert run_files.lock_holder(tmp_path) == os.getpid()
        assert holder_seen_from_another_process(tmp_path) == os.getpid()
    assert holder_seen_from_another_process(tmp_path) is None
    assert (tmp_path / run_files.LOCK).read_text() == f"{os.getpid()}\n"  # the last holder, read once it is free
    run_files.RunLock(tmp_path).release()


def holder_seen_from_another_process(run_dir):
    code = f"from trainer import run_dir as r; print(r.lock_holder({str(run_dir)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=process_env(), check=True)
    return None if out.stdout.strip() == "None" else int(out.stdout)


def test_a_process_forked_by_the_holder_does_not_hold_the_lock_once_the_holder_is_killed(tmp_path):
    # The OOM killer's kill -9 reaches the main process alone; its DataLoader workers live on for
    # seconds. A requeued run must take the directory at once.
    code = textwrap.dedent(f"""
        import os, sys, time
        from trainer import run_dir as r
        lock = r.RunLock({str(tmp_path)!r})
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=process_env())
    child = int(holder.stdout.readline())
    try:
        assert run_files.lock_holder(tmp_path) == holder.pid
        with pytest.raises(run_files.RunDirBusy) as busy:
            run_files.RunLock(tmp_path)
        assert busy.value.pid == holder.pid
        holder.kill()
        holder.wait()
        assert Path(f"/proc/{child}").exists()  # the orphan lives on
        assert run_files.lock_holder(tmp_path) is None
        run_files.RunLock(tmp_path).release()
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_link_in_place_of_the_lock_file_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("someone's file")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_files.LOCK).symlink_to(target)
    with pytest.raises(run_files.LockFileError, match=r"\.lock is a symbolic link; .* remove it \(rm "):
        run_files.RunLock(run_dir)
    assert target.read_text() == "someone's file"


def test_a_hard_link_in_place_of_the_lock_file_is_not_written_through(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("someone's file")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(target, run_dir / run_files.LOCK)
    with pytest.raises(run_files.LockFileError, match=r"\.lock is a hard link shared with 1 other name"):
        run_files.RunLock(run_dir)
    assert target.read_text() == "someone's file"


@pytest.mark.parametrize("kind", ["a folder", "a FIFO"])
def test_a_lock_file_that_is_no_file_is_named_for_what_it_is(tmp_path, kind):
    lock = tmp_path / run_files.LOCK
    lock.mkdir() if kind == "a folder" else os.mkfifo(lock)
    remove = "rm -r" if kind == "a folder" else "rm"
    with pytest.raises(run_files.LockFileError, match=rf"\.lock is {kind}; .* remove it \({remove} {lock}\)"):
        run_files.RunLock(tmp_path)


def test_clear_keeps_the_lock_and_removes_links_without_following_them(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("not the run's")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000001.pt").write_bytes(b"x")
    (run_dir / "link").symlink_to(outside)
    with run_files.RunLock(run_dir):
        run_files.clear(run_dir)
        assert [p.name for p in run_dir.iterdir()] == [run_files.LOCK]
    assert (outside / "kept.txt").read_text() == "not the run's"


# ------------------------------------------------------------------ the record of a run from code


def code_run(run_dir, callbacks=(), **config):
    model = mlp()
    x, y = classification(64)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                   callbacks=callbacks, config=quiet(batch_size=16, **config), run_dir=run_dir)


def status(run_dir) -> dict:
    return json.loads((run_dir / run_files.STATUS).read_text())


def test_a_run_from_code_writes_the_record_a_command_line_run_writes(tmp_path):
    class Seen(Callback):
        def on_fit_start(self, trainer):
            self.status = status(trainer.run_dir)

    seen = Seen()
    run_dir = tmp_path / "runs" / "mine"
    code_run(run_dir, [seen], max_steps=3).fit()
    assert seen.status == {"status": "running", "pid": os.getpid()}
    assert status(run_dir) == {"status": "finished", "pid": os.getpid(), "step": 3, "reason": "finished"}
    saved = yaml.safe_load((run_dir / run_files.CONFIG).read_text())
    assert TrainerConfig(**saved) == TrainerConfig(**quiet(batch_size=16, max_steps=3))
    assert run_files.lock_holder(run_dir) is None  # released when fit returns

    rows = in_process("runs", tmp_path / "runs").stdout.splitlines()
    assert rows[1].split()[:3] == ["mine", "finished", "3"]


def test_a_run_from_code_that_raises_says_failed_with_the_error(tmp_path):
    class Fails(Callback):
        def on_train_batch_end(self, trainer, outputs, batch):
            if trainer.global_step == 2:
                raise RuntimeError("the user's callback broke")

    with pytest.raises(RuntimeError, match="the user's callback broke"):
        code_run(tmp_path, [Fails()], max_steps=4).fit()
    assert status(tmp_path) == {"status": "failed", "pid": os.getpid(), "error": "RuntimeError: the user's callback broke",
                                "step": 2}
    assert run_files.lock_holder(tmp_path) is None


def test_a_run_from_code_stopped_by_a_callback_records_its_reason(tmp_path):
    class Stops(Callback):
        def on_train_batch_end(self, trainer, outputs, batch):
            trainer.stop("enough")

    code_run(tmp_path, [Stops()], max_steps=4).fit()
    assert status(tmp_path) == {"status": "finished", "pid": os.getpid(), "step": 1, "reason": "enough"}


def test_a_run_dir_holding_a_config_yaml_no_run_wrote_is_refused_and_left_as_it_is(tmp_path):
    (tmp_path / run_files.CONFIG).write_text("the user's own config\n")
    with pytest.raises(FileExistsError, match=r"holds a config.yaml that no run wrote \(no status.json beside it\); "
                                              r".*move the file or pass another run_dir"):
        code_run(tmp_path, max_steps=2).fit()
    assert (tmp_path / run_files.CONFIG).read_text() == "the user's own config\n"
    assert not (tmp_path / run_files.STATUS).exists()


def test_a_second_process_fitting_into_a_live_run_dir_is_refused(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from trainer import run_dir as r
        lock = r.RunLock({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=process_env())
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(run_files.RunDirBusy, match=rf"is in use by a live run \(process {holder.pid}, "):
            code_run(tmp_path, max_steps=2).fit()
        assert not (tmp_path / run_files.STATUS).exists() and not (tmp_path / run_files.METRICS_JSONL).exists()
    finally:
        holder.kill()
        holder.wait()
