"""Checkpoints under real faults: SIGKILL at chosen points, signals, broken files, NaN."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from helpers import batches, mlp, quiet
from trainer import Trainer
from trainer.checkpoint import (
    CheckpointError, find_resume_checkpoint, list_checkpoints, load_checkpoint, rotate, save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
PROJECT = Path(__file__).resolve().parent / "project"

EXACT = """\
name: exact
out_dir: {out}
trainer: killers.NoisyTrainer
seed: 3
max_epochs: 4
batch_size: 16
num_workers: 2
grad_accum_steps: 2
deterministic: true
log_every_n_steps: 1
eval_every_n_epochs: 2
progress_bar: false
checkpoint: {every_n_steps: 3, keep_last: 2}
model:
  _target_: trainer.examples.models.MLP
  in_features: 16
  hidden: 32
  out_features: 4
  dropout: 0.2
data:
  _target_: trainer.examples.synthetic.classification
  n_train: 200
  n_val: 64
loss: torch.nn.functional.cross_entropy
optimizer:
  _target_: torch.optim.AdamW
  lr: 1.0e-2
scheduler:
  _target_: torch.optim.lr_scheduler.StepLR
  step_size: 5
  gamma: 0.5
"""


def cli(*args, cwd=None, timeout=300, wait=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(PROJECT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "trainer", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def config(tmp_path, text=EXACT):
    path = tmp_path / "cfg.yaml"
    path.write_text(text.replace("{out}", str(tmp_path / "runs")))
    return path


def final_state(run_dir):
    files = list_checkpoints(run_dir / "checkpoints")
    return load_checkpoint(files[-1])


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def assert_tensors_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = cli("run", config(tmp))
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp / "runs" / "exact"
    return final_state(run_dir), train_losses(run_dir)


def assert_same_as_reference(reference, run_dir):
    ref_state, ref_losses = reference
    state = final_state(run_dir)
    assert state["trainer_state"]["global_step"] == ref_state["trainer_state"]["global_step"] == 28
    assert_tensors_equal(state["model"], ref_state["model"], "model")
    assert_tensors_equal(state["optimizer"], ref_state["optimizer"], "optimizer")
    assert train_losses(run_dir) == ref_losses  # every logged step, exactly


@pytest.mark.slow
@pytest.mark.parametrize("where,step", [("mid_accum", 8), ("epoch_end", 2), ("during_save", 9)])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, where, step):
    marker = tmp_path / "killed"
    text = EXACT + f"callbacks:\n  - {{_target_: killers.KillAt, where: {where}, step: {step}, marker: '{marker}'}}\n"
    cfg = config(tmp_path, text)
    first = cli("run", cfg)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert marker.exists()
    run_dir = tmp_path / "runs" / "exact"
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    if where == "during_save":
        assert leftovers, "the kill should have left a half-written temp file"
        assert "step-00000009.pt" not in [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    second = cli("run", cfg, "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert "resume: continuing from" in second.stdout
    assert_same_as_reference(reference, run_dir)


@pytest.mark.slow
def test_sigkill_from_outside_at_a_random_moment(reference, tmp_path):
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "exact"
    proc = cli("run", cfg, wait=False)
    deadline = time.time() + 120
    while not list_checkpoints(run_dir / "checkpoints") and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    second = cli("run", cfg, "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert_same_as_reference(reference, run_dir)


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_at_the_next_step_boundary_and_exits(tmp_path, signum, code):
    marker = tmp_path / "sent"
    text = EXACT.replace("num_workers: 2", "num_workers: 0") + (
        f"callbacks:\n  - {{_target_: killers.KillAt, where: mid_accum, step: 4, marker: '{marker}', "
        f"signum: {int(signum)}}}\n")
    proc = cli("run", config(tmp_path, text))
    assert proc.returncode == code, proc.stderr
    assert f"stopped by {signal.Signals(signum).name}" in proc.stdout
    files = list_checkpoints(tmp_path / "runs" / "exact" / "checkpoints")
    assert files[-1].name == "step-00000005.pt"  # the signal came inside step 5
    assert load_checkpoint(files[-1])["trainer_state"]["global_step"] == 5


def test_second_signal_during_the_save_corrupts_nothing(tmp_path):
    marker = tmp_path / "sent"
    text = EXACT.replace("num_workers: 2", "num_workers: 0") + (
        f"callbacks:\n  - {{_target_: killers.KillAt, where: during_save, step: 3, marker: '{marker}', "
        f"signum: {int(signal.SIGTERM)}, twice: true}}\n")
    proc = cli("run", config(tmp_path, text))
    assert proc.returncode == 143, proc.stderr
    run_dir = tmp_path / "runs" / "exact"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # The signals arrived while step 3 was being saved: that save completed, and the second one then
    # stopped the run at once. No temp file is left behind.
    assert names == ["step-00000003.pt"]
    assert "stopped at once by a second SIGTERM" in proc.stderr
    for name, step in zip(names, (3,)):
        assert load_checkpoint(run_dir / "checkpoints" / name)["trainer_state"]["global_step"] == step


def test_original_signal_handlers_are_restored():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        model = mlp()
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                config=quiet()).fit()
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------ files


def test_exception_inside_torch_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "step-00000001.pt")
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError, match="No space left on device.*Earlier checkpoints are intact"):
        save_checkpoint({"a": torch.ones(2)}, tmp_path / "step-00000002.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save_checkpoint({"a": 1}, blocker / "step-00000001.pt")


def test_keep_last_rotation_keeps_the_newest(tmp_path):
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(10, 4), loss_fn=F.cross_entropy,
                run_dir=tmp_path, config=quiet(checkpoint={"every_n_steps": 2, "keep_last": 2}))
    t.fit()
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000008.pt", "step-00000010.pt"]
    rotate(tmp_path / "checkpoints", 1)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000010.pt"]


def three_checkpoints(tmp_path):
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(6, 4), loss_fn=F.cross_entropy,
                run_dir=tmp_path, config=quiet(checkpoint={"every_n_steps": 2, "keep_last": None}))
    t.fit()
    return list_checkpoints(tmp_path / "checkpoints")


@pytest.mark.parametrize("damage", ["truncate", "empty", "bitflip"])
def test_bad_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    files = three_checkpoints(tmp_path)
    newest = files[-1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        for offset in range(len(data) // 2, len(data) // 2 + 64):
            data[offset] ^= 0xFF
        newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(newest.name)):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=newest.name):
        state = find_resume_checkpoint(tmp_path, "auto")
    assert state["trainer_state"]["global_step"] == 4 and state["path"] == str(files[-2])


def test_no_good_checkpoint_left_exits_2_naming_the_path(tmp_path):
    run_dir = tmp_path / "runs" / "exact"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000004.pt").write_bytes(b"PK\x03\x04garbage")
    proc = cli("run", config(tmp_path), "--resume", "auto")
    assert proc.returncode == 2
    assert "step-00000004.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert "PytorchStreamReader" not in proc.stderr.split("error:")[-1]


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    text = EXACT.replace("max_epochs: 4", "max_epochs: 1").replace("num_workers: 2", "num_workers: 0")
    proc = cli("run", config(tmp_path, text), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "no checkpoint" in proc.stdout and "starting from scratch" in proc.stdout


def test_pickled_object_payload_is_rejected(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "step-00000001.pt"
    torch.save({"version": 1, "model": Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled Python object.*refused"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_keys(tmp_path):
    model = mlp(sizes=(8, 16, 3))
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
            run_dir=tmp_path, config=quiet()).fit()
    other = mlp(sizes=(8, 32, 3))
    t = Trainer(other, torch.optim.SGD(other.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                config=quiet())
    with pytest.raises(CheckpointError, match=r"0.weight \(16, 8\) in the checkpoint vs \(32, 8\) now"):
        t.load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])


def test_checkpoint_holds_the_documented_keys_and_loads_weights_only(tmp_path):
    model = mlp()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
            run_dir=tmp_path, config=quiet()).fit()
    state = torch.load(list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)
    assert set(state) == {"version", "model", "optimizer", "scheduler", "scaler", "trainer_state", "rng",
                          "callbacks", "config"}
    assert set(state["rng"]) >= {"python", "numpy", "torch", "cuda"}
    assert state["trainer_state"]["global_step"] == 2


# ------------------------------------------------------------------ NaN


def nan_run(policy, tmp_path=None, **extra):
    sys.path.insert(0, str(PROJECT))
    from killers import NaNTrainer

    model = mlp(seed=2)
    t = NaNTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(8, 4), loss_fn=F.cross_entropy,
                   nan_step=5, run_dir=tmp_path, config=quiet(on_nonfinite=policy, **extra))
    return model, t


def test_nan_with_error_policy_stops_before_the_step_with_weights_of_step_4(tmp_path):
    model, t = nan_run("error", tmp_path, checkpoint={"every_n_steps": 1})
    with pytest.raises(FloatingPointError, match="step 5: train/loss is nan.*weights are those of step 4"):
        t.fit()
    ref = mlp(seed=2)
    Trainer(ref, torch.optim.SGD(ref.parameters(), lr=0.1), batches(4, 4), loss_fn=F.cross_entropy,
            config=quiet()).fit()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "step-00000004.pt"


def test_nan_with_skip_policy_skips_and_counts():
    model, t = nan_run("skip")
    with pytest.warns(UserWarning, match="step 5: train/loss is nan; skipped"):
        t.fit()
    assert t.global_step == 8 and t.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_consecutive_skips_become_an_error():
    model = mlp()

    class AlwaysNaN(Trainer):
        def training_step(self, batch):
            return super().training_step(batch) * float("nan")

    t = AlwaysNaN(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(8, 4), loss_fn=F.cross_entropy,
                  config=quiet(on_nonfinite="skip", max_consecutive_skips=3))
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="4 steps in a row"):
        t.fit()


def test_nan_on_the_device_path_with_a_fused_optimizer():
    """The CUDA path, run on CPU: the step skips itself on the device (fused optimizer) and the
    host finds out at the log point (here every step), naming the first bad step."""
    sys.path.insert(0, str(PROJECT))
    from killers import NaNTrainer

    model = mlp(seed=2)
    t = NaNTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True), batches(8, 4),
                   loss_fn=F.cross_entropy, nan_step=5, config=quiet(on_nonfinite="error", nonfinite_check="device"))
    with pytest.raises(FloatingPointError, match="step 5: train/loss or a gradient is not finite; the optimizer skipped that step on the device"):
        t.fit()
    ref = mlp(seed=2)
    Trainer(ref, torch.optim.SGD(ref.parameters(), lr=0.1, fused=True), batches(4, 4), loss_fn=F.cross_entropy,
            config=quiet()).fit()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert not hasattr(t.optimizer, "found_inf")

    model = mlp(seed=2)
    t = NaNTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True), batches(8, 4),
                   loss_fn=F.cross_entropy, nan_step=5,
                   config=quiet(on_nonfinite="skip", log_every_n_steps=4, nonfinite_check="device"))
    with pytest.warns(UserWarning, match="step 5: train/loss or a gradient is not finite; skipped"):
        t.fit()
    assert t.global_step == 8 and t.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
