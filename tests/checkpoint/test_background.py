"""checkpoint.async: a checkpoint written in a thread is the state at its step, rotation and links
wait for it, fit waits for the last one, a failed write is raised, and the config key reads
``async`` everywhere. (Kills and signals during a background write: test_files.py.)"""

import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from helpers import assert_tensors_equal, classification, in_process, mlp, quiet
from trainer import Callback, Trainer, TrainerConfig
from trainer.callbacks import BestCheckpoints
from trainer.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from trainer.checkpoint.state import config_changes


def build(run_dir, asynchronous, callbacks=(), max_steps=8, val=False, **checkpoint):
    model = mlp(dropout=0.1)
    x, y = classification(64)
    trainer = Trainer(
        model, torch.optim.AdamW(model.parameters(), lr=0.05), (x, y), val_data=(x[:16], y[:16]) if val else None,
        loss_fn=F.cross_entropy, run_dir=run_dir, callbacks=list(callbacks),
        config=quiet(max_steps=max_steps, batch_size=8, eval_every_n_steps=2 if val else None, eval_every_n_epochs=None,
                     checkpoint={"every_n_steps": 2, "keep_last": None, "async": asynchronous, **checkpoint}),
    )
    return trainer


def train(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.fit()
    return trainer


def without_config(state):
    return {key: value for key, value in state.items() if key != "config"}


class HeldWrite:
    """``torch.save``, patched: the checkpoint of ``step`` stops half-way in its writer thread (``reached``
    is set there) until ``release`` is set; what the folder looks like then is kept in ``seen``."""

    def __init__(self, monkeypatch, step, run_dir):
        self.step, self.run_dir, self.seen = step, Path(run_dir), {}
        self.reached, self.release = threading.Event(), threading.Event()
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("trainer_state", {}).get("global_step") == step:
                self.seen["thread"] = threading.current_thread().name
                folder = self.run_dir / "checkpoints"
                self.seen["files"] = [p.name for p in list_checkpoints(folder)]
                self.seen["temp"] = [p.name.split(".tmp-")[0] for p in folder.iterdir() if p.name.startswith(".")]
                self.reached.set()
                assert self.release.wait(60)
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)


class At(Callback):
    """Calls ``fn(trainer)`` after optimizer step ``step``."""

    def __init__(self, step, fn):
        self.step, self.fn = step, fn

    def on_train_batch_end(self, trainer, outputs, batch):
        if trainer.global_step == self.step:
            self.fn(trainer)


def test_a_background_checkpoint_is_the_state_at_its_step_while_the_loop_trains_on(tmp_path, monkeypatch):
    reference = train(tmp_path / "sync", False, keep_last=2, save_final=False)
    held = HeldWrite(monkeypatch, step=6, run_dir=tmp_path / "async")

    def go_on(trainer):  # step 7 done: the loop has changed the weights since step 6 ...
        assert held.reached.wait(60)  # ... while step 6's write is held half-way in its thread
        held.release.set()

    trainer = train(tmp_path / "async", True, callbacks=[At(7, go_on)], keep_last=2, save_final=False)
    assert held.seen["thread"] == "checkpoint-step-6"
    # Rotation (keep_last: 2) waits for the file it keeps: step 2 is still there while step 6 is a temp file.
    assert held.seen["files"] == ["step-00000002.pt", "step-00000004.pt"]
    assert held.seen["temp"] == [".step-00000006.pt"]
    # ... and runs once the file is complete: after step 8's write (the last, waited for by fit) two are left.
    names = [p.name for p in list_checkpoints(tmp_path / "async" / "checkpoints")]
    assert names == [p.name for p in list_checkpoints(tmp_path / "sync" / "checkpoints")] == [
        "step-00000006.pt", "step-00000008.pt"]
    for name in names:  # bit for bit what the synchronous run wrote at that step
        written = load_checkpoint(tmp_path / "async" / "checkpoints" / name)
        assert_tensors_equal(without_config(written), without_config(load_checkpoint(tmp_path / "sync" / "checkpoints" / name)))
        assert written["config"]["checkpoint"]["async"] is True
    assert_tensors_equal(trainer.module.state_dict(), reference.module.state_dict())


def test_fit_returns_once_the_last_background_write_is_on_disk(tmp_path, monkeypatch):
    held = HeldWrite(monkeypatch, step=8, run_dir=tmp_path)
    timer = threading.Timer(0.3, held.release.set)  # fit must wait for the release, however late
    timer.start()
    try:
        train(tmp_path, True, save_final=False)
    finally:
        timer.cancel()
    assert held.seen["thread"] == "checkpoint-step-8"
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000008.pt")["trainer_state"]["global_step"] == 8
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_outside_fit_a_save_is_written_before_it_returns(tmp_path, monkeypatch):
    trainer = train(tmp_path, True, max_steps=2)
    threads = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (threads.append(threading.current_thread()),
                                                                real(obj, f, *a, **k)))
    path = trainer.save_checkpoint(tmp_path / "checkpoints" / "extra.pt")
    assert threads == [threading.main_thread()] and load_checkpoint(path)["trainer_state"]["global_step"] == 2


def test_a_save_that_waits_for_the_write_before_it_says_so_once(tmp_path, monkeypatch):
    # The write of step 2 is held until the loop, at step 4, waits for it.
    held = HeldWrite(monkeypatch, step=2, run_dir=tmp_path)
    main = threading.main_thread().ident

    def release_when_waited_for():
        while not held.release.is_set():
            frame = sys._current_frames().get(main)
            while frame is not None and frame.f_code.co_name != "wait":
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.endswith("background.py"):
                held.release.set()
            threading.Event().wait(0.005)

    watcher = threading.Thread(target=release_when_waited_for, daemon=True)
    watcher.start()
    with pytest.warns(UserWarning, match=r"the write of step 2 was still in flight when step 4 saved; the loop "
                                         r"waited [\d.]+ s for it\. .*raise checkpoint\.every_n_steps") as caught:
        train(tmp_path, True)
    assert len([w for w in caught if "still in flight" in str(w.message)]) == 1


def test_best_checkpoints_link_a_complete_file(tmp_path):
    runs = {}
    for name, asynchronous in (("sync", False), ("async", True)):
        train(tmp_path / name, asynchronous, callbacks=[BestCheckpoints(monitor="val/loss")], val=True)
        folder = tmp_path / name / "checkpoints"
        best = [p for p in folder.iterdir() if p.name.startswith("best-step-")]
        assert len(best) == 1 and os.path.samefile(best[0], folder / "best.pt")
        runs[name] = (best[0].name, load_checkpoint(folder / "best.pt"))
    assert runs["sync"][0] == runs["async"][0]
    assert_tensors_equal(without_config(runs["sync"][1]), without_config(runs["async"][1]))


# ------------------------------------------------------------------ a write that fails


def fill(trainer):
    """Once the write in flight is done, fill the checkpoint folder's disk."""
    trainer._checkpointer.wait()
    with open(trainer.run_dir / "checkpoints" / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC


@pytest.mark.parametrize("max_steps,found_at", [(8, 6), (4, 4)])
def test_a_failed_background_write_is_raised_by_the_next_save_or_by_fit(tmp_path, mount_tmpfs, max_steps, found_at):
    # The disk is full from step 3 on: the write of step 4 fails in its thread, and the run fails at
    # the next save (step 6), or at the end of fit when there is none (save_final: false).
    run_dir = tmp_path / "run"
    folder = mount_tmpfs("1m", at=run_dir / "checkpoints")
    trainer = build(run_dir, True, callbacks=[At(3, fill)], max_steps=max_steps, save_final=False)
    with pytest.raises(CheckpointError) as raised:
        trainer.fit()
    assert trainer.global_step == found_at
    assert str(raised.value).startswith(
        f"checkpoint.async: the background write of step 4 failed: could not write checkpoint {folder}/step-00000004.pt: "
        f"No space left on device in {folder} (")
    assert f"the last complete checkpoint is {folder}/step-00000002.pt (step 2), intact" in str(raised.value)
    assert sorted(p.name for p in folder.iterdir()) == ["filler", "step-00000002.pt"]  # no temp file
    assert load_checkpoint(folder / "step-00000002.pt")["trainer_state"]["global_step"] == 2


def test_a_failed_background_write_is_reported_beside_the_exception_that_ends_the_run(tmp_path, mount_tmpfs,
                                                                                      capsys):
    run_dir = tmp_path / "run"
    folder = mount_tmpfs("1m", at=run_dir / "checkpoints")

    def boom(trainer):
        raise RuntimeError("boom")

    trainer = build(run_dir, True, callbacks=[At(3, fill), At(5, boom)], save_final=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert (f"trainer: checkpoint.async: the background write of step 4 failed: could not write checkpoint "
            f"{folder}/step-00000004.pt: No space left on device in {folder}") in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["filler", "step-00000002.pt"]


# ------------------------------------------------------------------ the key is `async`


def test_the_key_is_async_in_files_and_either_name_in_code():
    assert TrainerConfig(checkpoint={"async": True}).checkpoint.async_ is True
    assert TrainerConfig(checkpoint={"async_": True}).model_dump(mode="json")["checkpoint"]["async"] is True
    assert TrainerConfig().model_json_schema()["$defs"]["CheckpointConfig"]["properties"]["async"]["default"] is False
    saved, now = TrainerConfig().model_dump(mode="json"), TrainerConfig(checkpoint={"async": True}).model_dump(mode="json")
    assert config_changes(saved, now) == [("checkpoint.async", False, True)]


def test_check_shows_async_and_names_it_in_errors(project):
    cfg = project.write(project.text + "checkpoint: {async: true}\n")
    proc = in_process("check", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint:\n  every_n_steps: null\n  keep_last: 3\n  save_final: true\n  async: true\n" in proc.stdout
    project.write(project.text + "checkpoint: {asyn: true}\n")
    proc = in_process("check", cfg)
    assert proc.returncode == 2 and "checkpoint.asyn: unknown key 'asyn'; did you mean 'async'?" in proc.stderr
    proc = in_process("check", project.write(project.text), "checkpoint.async=maybe")
    assert proc.returncode == 2 and "checkpoint.async: Input should be a valid boolean" in proc.stderr


def test_resuming_with_async_turned_on_is_accepted_and_listed(tmp_path):
    train(tmp_path / "sync", False, max_steps=4)
    resumed = build(tmp_path / "async", True, max_steps=6)
    changes = resumed.load_checkpoint(tmp_path / "sync" / "checkpoints" / "step-00000004.pt")
    assert changes == ["checkpoint.async: False -> True", "max_steps: 4 -> 6"]
    resumed.fit()
    assert load_checkpoint(tmp_path / "async" / "checkpoints" / "step-00000006.pt")["config"]["checkpoint"]["async"]
