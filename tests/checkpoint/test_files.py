"""Checkpoints under real faults: SIGKILL at chosen points, signals, broken files, NaN."""

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile

import pytest
import torch
from torch.nn import functional as F

from helpers import assert_tensors_equal, batches, in_process, mlp, process_env, project_config, project_module, quiet
from trainer import Trainer
from trainer.checkpoint import (
    CheckpointError, find_resume_checkpoint, list_checkpoints, load_checkpoint, rotate, save_checkpoint, save_sharded,
)

# The test project (helpers.PROJECT_CONFIG) made to draw from every random generator (NoisyTrainer,
# dropout, two loader workers), with accumulation, a schedule and validation: 28 steps in four epochs.
EXACT = project_config(
    name="exact", out_dir="{out}", trainer="killers.NoisyTrainer", seed=3, max_steps=None, max_epochs=4, num_workers=2,
    grad_accum_steps=2, deterministic=True, log_every_n_steps=1, eval_every_n_epochs=2,
    checkpoint={"every_n_steps": 3, "keep_last": 2}, model={"hidden": 32, "dropout": 0.2},
    data={"n_train": 200, "n_val": 64}, optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-2},
    scheduler={"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 5, "gamma": 0.5})


def cli(*args, cwd=None, timeout=300, wait=True):
    """``trainer ARGS`` as a real process in a session of its own: for a kill, a signal, an exit status,
    Python's warning lines. Waited for (``ended``) unless ``wait`` is false. Its output goes to files:
    the DataLoader workers of a killed run would hold pipes open until they notice, 5 s later, that
    their parent is gone."""
    out, err = (tempfile.TemporaryFile("w+") for _ in range(2))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=process_env(),
                            stdout=out, stderr=err, text=True, start_new_session=True)
    proc.output = out, err
    return ended(proc, timeout) if wait else proc


def ended(proc, timeout=300) -> subprocess.CompletedProcess:
    """The process ``cli`` started, once it has ended, and what it printed; what it left in its
    session (the workers of a killed run) is killed."""
    try:
        proc.wait(timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    printed = []
    for file in proc.output:
        file.seek(0)
        printed.append(file.read())
        file.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, *printed)


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


@pytest.fixture(scope="module")
def reference(shared_run):
    """The uninterrupted run, made once (in a test process: what the tests check is that a killed run
    resumes to it)."""

    def make(folder):
        proc = in_process("run", config(folder))
        assert proc.returncode == 0, proc.stderr

    run_dir = shared_run("files.reference", make) / "runs" / "exact"
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
    second = in_process("run", cfg, "--resume", "auto")
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
    proc.send_signal(signal.SIGKILL)  # the main process alone
    ended(proc)
    second = in_process("run", cfg, "--resume", "auto")
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


# ------------------------------------------------------------------ checkpoint.async: a write in flight

ASYNC = EXACT.replace("checkpoint: {every_n_steps: 3, keep_last: 2}",
                      "checkpoint: {every_n_steps: 3, keep_last: 2, async: true}")


def async_kill(tmp_path, step, signum=signal.SIGKILL, twice=False, workers=2):
    text = ASYNC.replace("num_workers: 2", f"num_workers: {workers}") + (
        f"callbacks:\n  - {{_target_: killers.KillAt, where: during_async_write, step: {step}, "
        f"marker: '{tmp_path / 'sent'}', signum: {int(signum)}, twice: {str(twice).lower()}}}\n")
    return config(tmp_path, text)


def temp_files(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_sigkill_during_a_background_write_resumes_from_the_checkpoint_before(reference, tmp_path):
    # Killed half-way through writing step 9 in the background, with the loop at step 10: the step-9
    # file is a temp file that nothing takes for a checkpoint, step 6 is whole, and the resumed run
    # (async too) ends bit-identical to the uninterrupted run with synchronous checkpoints.
    cfg = async_kill(tmp_path, step=9)
    first = cli("run", cfg)
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = tmp_path / "runs" / "exact"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000003.pt", "step-00000006.pt"]
    assert [name.split(".tmp-")[0] for name in temp_files(run_dir)] == [".step-00000009.pt"]
    second = in_process("run", cfg, "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert f"continuing from {run_dir / 'checkpoints' / 'step-00000006.pt'} (step 6)" in second.stdout
    assert temp_files(run_dir) == []
    assert_same_as_reference(reference, run_dir)


def test_sigterm_during_a_background_write_finishes_it_and_stops_as_a_signal_does(tmp_path):
    # SIGTERM arrives while step 3 is written in the background and the loop has done step 4: the
    # write completes, step 4 is the stop checkpoint (it waits for the write before it), exit 143.
    proc = cli("run", async_kill(tmp_path, step=3, signum=signal.SIGTERM, workers=0))
    assert proc.returncode == 143, proc.stderr
    assert "stopped by SIGTERM" in proc.stdout
    run_dir = tmp_path / "runs" / "exact"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003.pt", "step-00000004.pt"]
    for step in (3, 4):
        assert load_checkpoint(run_dir / "checkpoints" / f"step-{step:08d}.pt")["trainer_state"]["global_step"] == step
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"


def test_a_second_sigterm_during_a_background_write_finishes_it_then_stops_at_once(tmp_path):
    proc = cli("run", async_kill(tmp_path, step=3, signum=signal.SIGTERM, twice=True, workers=0))
    assert proc.returncode == 143, proc.stderr
    assert "stopped at once by a second SIGTERM" in proc.stderr
    run_dir = tmp_path / "runs" / "exact"
    # No stop checkpoint after a second signal; the one being written is whole, and no temp file is left.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "step-00000003.pt")["trainer_state"]["global_step"] == 3
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["step"]) == ("interrupted", 4)


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


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded")])
def test_exception_inside_torch_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch, code, words):
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "step-00000001.pt")
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(code, words)

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError, match=rf"{words} in .*the last complete checkpoint is "
                                              r".*step-00000001.pt \(step 1\), intact"):
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
    proc = in_process("run", config(tmp_path), "--resume", "auto")
    assert proc.returncode == 2
    assert "step-00000004.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert "PytorchStreamReader" not in proc.stderr.split("error:")[-1]


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    text = EXACT.replace("max_epochs: 4", "max_epochs: 1").replace("num_workers: 2", "num_workers: 0")
    proc = in_process("run", config(tmp_path, text), "--resume", "auto")
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
                          "callbacks", "loggers", "states", "unfrozen", "config"}
    assert set(state["rng"]) >= {"python", "numpy", "torch", "cuda"}
    assert state["trainer_state"]["global_step"] == 2


# ------------------------------------------------------------------ digests


def small_checkpoint(tmp_path):
    """A real checkpoint of a small run (about 20 kB: the RNG states are most of it)."""
    model = mlp()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
            run_dir=tmp_path, config=quiet()).fit()
    return list_checkpoints(tmp_path / "checkpoints")[-1]


def legacy_copy(path, to):
    """The same checkpoint as the files written before digests: ``torch.save`` straight to the file."""
    torch.save(load_checkpoint(path), to)
    return to


def zip_metadata(data):
    """Every byte position of the zip's own structure: local headers with their extra fields, the
    central directory, the (zip64) end records and the comment."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    positions = set(range(archive.start_dir, len(data)))
    for info in archive.infolist():
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
        positions.update(range(info.header_offset, info.header_offset + 30 + name_len + extra_len))
    return positions


def central_entry(data, record):
    """Where the central-directory entry of ``record`` (a name ending, e.g. "data/0") starts."""
    at = zipfile.ZipFile(io.BytesIO(data)).start_dir
    while data[at: at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[at + 28: at + 34])
        if data[at + 46: at + 46 + name_len].decode().endswith(record):
            return at
        at += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"no record {record}")


# The attacker's two flips: a data record marked as a directory (external attributes, bit 4), which
# torch reads as uninitialised memory, and a record marked deflated (compression method, bit 3).
DAMAGE = {"external_attributes": (38, 0x10), "compression_method": (10, 0x08)}


def damage(path, how, record="data/0"):
    data = bytearray(path.read_bytes())
    offset, bit = DAMAGE[how]
    data[central_entry(data, record) + offset] ^= bit
    path.write_bytes(bytes(data))


def flip_each(path, positions, may_load=None):
    """Flip one bit (a different one from position to position) at each position of the real file,
    load it, and put the byte back. Returns, by position, every load that was not refused with a
    ``CheckpointError``, unless it loaded exactly ``may_load``."""
    data = path.read_bytes()
    outcomes = {}
    with open(path, "r+b") as f:
        for pos in sorted(positions):
            f.seek(pos)
            f.write(bytes([data[pos] ^ (1 << pos % 8)]))
            f.flush()
            try:
                state = load_checkpoint(path)
                if may_load is None:
                    outcomes[pos] = f"loaded (global_step {state['trainer_state']['global_step']})"
                else:
                    assert_tensors_equal(state, may_load)
            except CheckpointError:
                pass
            except Exception as exc:  # other values (AssertionError), or any other exception type
                outcomes[pos] = f"{type(exc).__name__}: {exc}"
            f.seek(pos)
            f.write(data[pos: pos + 1])
            f.flush()
    return outcomes


def test_a_checkpoint_is_one_zip_whose_comment_is_the_sha256_of_the_rest(tmp_path):
    path = small_checkpoint(tmp_path)
    data = path.read_bytes()
    comment = zipfile.ZipFile(path).comment
    assert comment == b"trainer-sha256:" + hashlib.sha256(data[: -len(comment)]).hexdigest().encode()
    assert torch.load(path, weights_only=True)["trainer_state"]["global_step"] == 2  # an ordinary torch file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file with a digest loads without a word
        assert load_checkpoint(path)["trainer_state"]["global_step"] == 2


@pytest.mark.parametrize("sample", ["metadata_and_every_7th", pytest.param("every_byte", marks=pytest.mark.slow)])
def test_any_byte_changed_is_refused(tmp_path, sample):
    path = small_checkpoint(tmp_path)
    data = path.read_bytes()
    positions = range(len(data)) if sample == "every_byte" else zip_metadata(data) | set(range(0, len(data), 7))
    assert flip_each(path, positions) == {}
    assert load_checkpoint(path)["trainer_state"]["global_step"] == 2  # every byte was put back


@pytest.mark.parametrize("how", DAMAGE)
def test_the_attackers_flips_are_refused_with_the_digest_and_without(tmp_path, how):
    path = small_checkpoint(tmp_path)
    legacy = legacy_copy(path, tmp_path / "legacy.pt")
    for file, reason in ((path, "do not match the SHA-256 digest"), (legacy, "is not stored the way torch.save")):
        damage(file, how)
        with pytest.raises(CheckpointError, match=f"{file.name} is corrupted.*{reason}"):
            load_checkpoint(file)


@pytest.mark.slow
def test_a_bit_flipped_in_the_zip_structure_of_a_file_without_digest_never_loads_other_values(tmp_path):
    path = small_checkpoint(tmp_path)
    legacy = legacy_copy(path, tmp_path / "legacy.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "carries no digest", once per load that passes
        assert flip_each(legacy, zip_metadata(legacy.read_bytes()), may_load=load_checkpoint(path)) == {}


def test_a_checkpoint_without_digest_loads_with_a_warning_and_resumes_the_same(tmp_path):
    path = small_checkpoint(tmp_path / "run")
    legacy = legacy_copy(path, tmp_path / "legacy.pt")
    with pytest.warns(UserWarning, match="legacy.pt carries no digest"):
        assert_tensors_equal(load_checkpoint(legacy), load_checkpoint(path))
    finals = []
    for source in (path, legacy):
        model = mlp()
        t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                    config=quiet(max_epochs=2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(resume_from=source)
        finals.append(t.state_dict())
    assert finals[0]["trainer_state"]["global_step"] == 4
    assert_tensors_equal(finals[1]["model"], finals[0]["model"], "model")
    assert_tensors_equal(finals[1]["optimizer"], finals[0]["optimizer"], "optimizer")


def without(state, dotted):
    *parents, name = dotted.split(".")
    for part in parents:
        state = state[part]
    del state[name]


def replaced(state, dotted, value):
    *parents, name = dotted.split(".")
    for part in parents:
        state = state[part]
    state[name] = value


@pytest.mark.parametrize("change,expected", [
    (lambda s: without(s, "trainer_state.global_step"), "trainer_state.global_step is missing"),
    (lambda s: without(s, "rng.python"), "rng.python is missing"),
    (lambda s: without(s, "optimizer"), "optimizer is missing"),
    (lambda s: replaced(s, "trainer_state", [1, 2]), "trainer_state is a list, not dict"),
    (lambda s: replaced(s, "trainer_state.epoch", "1"), "trainer_state.epoch is a str, not int"),
    (lambda s: replaced(s, "trainer_state.epoch", True), "trainer_state.epoch is a bool, not int"),
    (lambda s: replaced(s, "rng.torch", [0, 1]), "rng.torch is a list, not Tensor"),
    (lambda s: s["model"].update({"0.weight": 1.5}), "model.0.weight is a float, not a tensor"),
    (lambda s: replaced(s, "version", 2), "format version 2; this trainer reads version 1"),
    (lambda s: s.clear(), "not a trainer checkpoint"),
    (lambda s: s.update(shards={}), "is the trainer.pt of a sharded checkpoint"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_a_file_that_loads_but_is_not_a_whole_checkpoint_is_corrupt(tmp_path, change, expected):
    files = three_checkpoints(tmp_path)
    state = load_checkpoint(files[-1])
    change(state)
    save_checkpoint(state, files[-1])  # with a digest that matches: the damage is in what it holds
    with pytest.raises(CheckpointError, match=f"{files[-1].name}.*{expected}"):
        load_checkpoint(files[-1])
    with pytest.warns(UserWarning, match=files[-1].name):
        assert find_resume_checkpoint(tmp_path, "auto")["path"] == str(files[-2])


def test_fallback_warns_naming_the_bad_file_and_the_chosen_one(tmp_path):
    files = three_checkpoints(tmp_path)
    damage(files[-1], "external_attributes")
    with pytest.warns(UserWarning) as caught:
        assert find_resume_checkpoint(tmp_path, "auto")["path"] == str(files[-2])
    assert any(str(files[-1]) in str(w.message) and str(files[-2]) in str(w.message) for w in caught)


def sharded_checkpoint(tmp_path):
    """A sharded checkpoint directory written in one process, as one rank of fsdp writes it."""
    model = mlp()
    t = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                config=quiet())
    t.fit()
    state = t.state_dict()
    tensors = {"model": state["model"], "optimizer": state["optimizer"]["state"]}
    state = {**state, "model": None, "optimizer": {"param_groups": state["optimizer"]["param_groups"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: no process group, so a single process
        return save_sharded(state, tensors, tmp_path / "step-00000002", is_main=True)


@pytest.mark.parametrize("shard", ["__0_0.distcp", ".metadata"])
def test_a_shard_file_changed_but_of_its_size_is_refused(tmp_path, shard):
    directory = sharded_checkpoint(tmp_path)
    trainer_pt = load_checkpoint(directory)
    assert set(trainer_pt["shard_sha256"]) == set(trainer_pt["shards"]) == {"__0_0.distcp", ".metadata"}
    data = bytearray((directory / shard).read_bytes())
    data[len(data) // 2] ^= 0x01
    (directory / shard).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"shard file {shard} does not match the SHA-256 digest"):
        load_checkpoint(directory)


def test_a_sharded_checkpoint_without_shard_digests_loads_with_a_warning(tmp_path):
    directory = sharded_checkpoint(tmp_path)
    state = torch.load(directory / "trainer.pt", weights_only=True)
    del state["shard_sha256"]
    torch.save(state, directory / "trainer.pt")  # as trainer.pt was written before digests
    with pytest.warns(UserWarning, match="trainer.pt carries no digest"):
        assert load_checkpoint(directory)["sharded"] == str(directory)


SMALL = EXACT.replace("max_epochs: 4", "max_epochs: 2").replace("num_workers: 2", "num_workers: 0")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run's directory, to copy and damage: checkpoints at steps 12 and 14 (the last)."""
    tmp = tmp_path_factory.mktemp("small_run")
    proc = in_process("run", config(tmp, SMALL))
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in list_checkpoints(tmp / "runs" / "exact" / "checkpoints")][-2:] == [
        "step-00000012.pt", "step-00000014.pt"]
    return tmp / "runs"


@pytest.mark.parametrize("how", DAMAGE)
def test_eval_of_a_damaged_checkpoint_exits_2_with_one_line(small_run, tmp_path, how):
    shutil.copytree(small_run, tmp_path / "runs")
    newest = tmp_path / "runs" / "exact" / "checkpoints" / "step-00000014.pt"
    damage(newest, how)
    proc = in_process("eval", config(tmp_path, SMALL), "--checkpoint", newest)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # no metrics of other weights
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {newest} is corrupted") and "Traceback" not in proc.stderr


def test_resume_auto_past_a_damaged_checkpoint_names_both_files(small_run, tmp_path):
    shutil.copytree(small_run, tmp_path / "runs")
    checkpoints = tmp_path / "runs" / "exact" / "checkpoints"
    damage(checkpoints / "step-00000014.pt", "external_attributes")
    proc = in_process("run", config(tmp_path, SMALL), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert f"{checkpoints / 'step-00000014.pt'} could not be loaded; falling back to " \
           f"{checkpoints / 'step-00000012.pt'} (step 12)" in proc.stderr
    assert f"resume: continuing from {checkpoints / 'step-00000012.pt'}" in proc.stdout
    assert load_checkpoint(checkpoints / "step-00000014.pt")["trainer_state"]["global_step"] == 14  # written anew


# ------------------------------------------------------------------ NaN


def nan_run(policy, tmp_path=None, **extra):
    NaNTrainer = project_module("killers").NaNTrainer

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
    NaNTrainer = project_module("killers").NaNTrainer

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


def test_a_device_or_a_fifo_is_named_for_what_it_is_and_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.pt")  # opened, it would wait for a writer
    for path, kind in (("/dev/zero", "a character device"), (tmp_path / "pipe.pt", "a FIFO (named pipe)")):
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{path} is {kind}, not a checkpoint: name a checkpoint")):
            load_checkpoint(path)


def test_resume_auto_says_what_it_found_once_under_torchrun(small_run, monkeypatch, capsys):
    """Every rank looks for the checkpoint to resume from; rank 0 alone says which it found."""
    said = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert find_resume_checkpoint(small_run / "exact", "auto")["trainer_state"]["global_step"] == 14
        said[rank] = capsys.readouterr().out
    newest = small_run / "exact" / "checkpoints" / "step-00000014.pt"
    assert said == {"1": "", "0": f"resume: continuing from {newest} (step 14)\n"}
