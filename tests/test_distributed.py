"""torchrun with two CPU ranks (gloo) on loopback, as a user launches it."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointError, find_resume_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROJECT = Path(__file__).resolve().parent / "project"

CONFIG = """\
name: {name}
out_dir: {out}
seed: 5
max_epochs: 3
batch_size: {batch}
log_every_n_steps: 1
progress: "off"
checkpoint: {{every_n_steps: 4, keep_last: 2}}
model:
  _target_: trainer.examples.models.MLP
  in_features: 16
  hidden: 32
  out_features: 4
data:
  _target_: trainer.examples.synthetic.classification
  n_train: 128
  n_val: 50
loss: torch.nn.functional.cross_entropy
optimizer:
  _target_: torch.optim.AdamW
  lr: 1.0e-2
"""


def loopback_ok() -> bool:
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            a.listen(1)
            b.connect(a.getsockname())
        return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not loopback_ok(), reason="this machine cannot open loopback sockets between processes"),
]


def env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(PROJECT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def torchrun(*args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def single(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env())


def write(tmp_path, name, batch, extra=""):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, out=tmp_path / "runs", batch=batch) + extra)
    return path


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The run of one process with twice the batch (16), which two ranks of 8 must match; made once."""
    tmp = tmp_path_factory.mktemp("one_process")
    one = single("run", write(tmp, "single", batch=16))
    assert one.returncode == 0, one.stderr
    return tmp / "runs" / "single"


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path, one_process):
    two = torchrun("run", write(tmp_path, "ddp", batch=8))
    assert two.returncode == 0, two.stderr[-3000:]
    ddp_dir, single_dir = tmp_path / "runs" / "ddp", one_process

    a, b = final(ddp_dir), final(single_dir)
    assert a["trainer_state"]["global_step"] == b["trainer_state"]["global_step"] == 24
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6)

    # Rank 0 alone wrote: one record per step, not two; the logged loss is the mean over ranks,
    # which for equal shares is the loss of the combined batch.
    ddp_records, single_records = records(ddp_dir), records(single_dir)
    ddp_steps = [r["step"] for r in ddp_records if "train/loss" in r]
    assert ddp_steps == list(range(1, 25))
    ddp_loss = [r["train/loss"] for r in ddp_records if "train/loss" in r]
    single_loss = [r["train/loss"] for r in single_records if "train/loss" in r]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)
    # Validation is exact over the ranks' shares (50 samples, 25 each, none counted twice).
    ddp_val = [r["val/loss"] for r in ddp_records if "val/loss" in r]
    single_val = [r["val/loss"] for r in single_records if "val/loss" in r]
    assert ddp_val == pytest.approx(single_val, rel=1e-5)
    assert sorted(p.name for p in ddp_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.csv",
                                                        "metrics.jsonl", "status.json"]
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["step-00000020.pt", "step-00000024.pt"]
    # A DDP checkpoint holds the plain module's keys, so it loads in a single process.
    assert not any(k.startswith("module.") for k in a["model"])


def test_two_nodes_with_a_rendezvous_endpoint(tmp_path, one_process):
    # Two torchrun agents, one per "machine" (node_rank 0 and 1, one process each: both have
    # LOCAL_RANK 0), meeting at a c10d rendezvous endpoint on loopback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write(tmp_path, "nodes", batch=8)
    agents = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                          "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                          "--rdzv_id=nodes-test", "-m", "trainer", "run", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=240) for agent in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    a, b = final(tmp_path / "runs" / "nodes"), final(one_process)
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in records(tmp_path / "runs" / "nodes") if "train/loss" in r] == list(range(1, 25))


def test_fewer_validation_samples_than_ranks(tmp_path):
    # One validation sample: rank 1's share is empty; it adds zeros to the exact reduction.
    def cfg(name, batch):
        path = write(tmp_path, name, batch=batch)
        path.write_text(path.read_text().replace("n_val: 50", "n_val: 1").replace("max_epochs: 3", "max_epochs: 1"))
        return path

    two = torchrun("run", cfg("ddp", 8))
    assert two.returncode == 0, two.stderr[-3000:]
    one = single("run", cfg("single", 16))
    assert one.returncode == 0, one.stderr[-3000:]
    val = lambda d: [r["val/loss"] for r in records(d) if "val/loss" in r]
    assert val(tmp_path / "runs" / "ddp") == pytest.approx(val(tmp_path / "runs" / "single"), rel=1e-5)
    assert len(val(tmp_path / "runs" / "ddp")) == 1


@pytest.mark.slow
def test_killed_two_rank_run_resumes_bit_identically(tmp_path):
    reference = torchrun("run", write(tmp_path, "ref", batch=8, extra="trainer: killers.NoisyTrainer\n"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    marker = tmp_path / "killed"
    kill = (f"trainer: killers.NoisyTrainer\ncallbacks:\n  - {{_target_: killers.KillAt, where: after_step, "
            f"step: 10, marker: '{marker}'}}\n")
    cfg = write(tmp_path, "ref2", batch=8, extra=kill)
    first = torchrun("run", cfg)
    assert first.returncode != 0 and marker.exists()
    second = torchrun("run", cfg, "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = final(tmp_path / "runs" / "ref"), final(tmp_path / "runs" / "ref2")
    assert a["trainer_state"]["global_step"] == b["trainer_state"]["global_step"] == 24
    for part in ("model", "optimizer"):
        for key, value in a[part].items() if part == "model" else a[part]["state"].items():
            other = b[part][key] if part == "model" else b[part]["state"][key]
            if isinstance(value, dict):
                for k, v in value.items():
                    assert torch.equal(v, other[k]), (part, key, k)
            else:
                assert torch.equal(value, other), (part, key)
    loss = lambda d: [(r["step"], r["train/loss"]) for r in records(d) if "train/loss" in r]
    assert loss(tmp_path / "runs" / "ref2") == loss(tmp_path / "runs" / "ref")


def _worker_pids(agent_pid):
    """torchrun's worker processes by rank, read from their environment."""
    pids = {}
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((e[5:] for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            pids[int(rank)] = int(child)
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    cfg = write(tmp_path, "term", batch=8).read_text()
    # Far more epochs than it can run before the signal, however late a loaded machine lets the test
    # look (with 500 a run could finish first, and the signal then hit an exited process).
    cfg = cfg.replace("max_epochs: 3", "max_epochs: 1000000").replace("log_every_n_steps: 1", "log_every_n_steps: 5")
    cfg = cfg.replace("checkpoint: {every_n_steps: 4, keep_last: 2}", "checkpoint: {every_n_steps: 100000}")
    (tmp_path / "term.yaml").write_text(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", "run", str(tmp_path / "term.yaml")]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    run_dir = tmp_path / "runs" / "term"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= 4):
        time.sleep(0.2)
    workers = _worker_pids(agent.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGTERM)  # rank 1 alone is told to stop
    out, err = agent.communicate(timeout=120)

    assert agent.returncode != 0, out[-2000:] + err[-3000:]  # each worker exits 143; torchrun reports them
    assert "stopped by SIGTERM" in out, out + err[-2000:]  # said by rank 0, which got no signal itself
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert len(checkpoints) == 1
    step = load_checkpoint(checkpoints[0])["trainer_state"]["global_step"]
    assert step % 5 == 0  # the ranks agreed at a log point
    assert records(run_dir)[-1]["step"] == step
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"

    resumed = torchrun("run", tmp_path / "term.yaml", "--resume", "auto", f"max_steps={step + 5}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"finished: step {step + 5}" in resumed.stdout


def test_a_rank_that_raises_ends_the_job_quickly(tmp_path):
    cfg = write(tmp_path, "fail", batch=8, extra="trainer: {_target_: killers.FailOnRank, rank: 1, step: 3}\n")
    start = time.monotonic()
    proc = torchrun("run", cfg, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 1 fails at step 3" in proc.stdout + proc.stderr
    assert elapsed < 60


# ----------------------------------------------------------------------------- strategy: fsdp

LM_CONFIG = """\
name: {name}
out_dir: {out}
seed: 3
max_epochs: 2
batch_size: {batch}
grad_accum_steps: 2
log_every_n_steps: 3
progress: "off"
grad_logging: {{every_n_steps: 3}}
checkpoint: {checkpoint}
model:
  _target_: trainer.examples.char_lm.CharTransformer
  block_size: 16
  d_model: 32
  n_layers: 2
  n_heads: 2
  dropout: {dropout}
data:
  _target_: trainer.examples.char_lm.load
  block_size: 16
  max_bytes: 2240
  val_fraction: 0.1
loss: trainer.examples.char_lm.lm_loss
optimizer: {optimizer}
"""
ADAMW = "{_target_: torch.optim.AdamW, lr: 3.0e-3}"
# Adam divides by the root of tiny second moments for rarely seen bytes' embeddings, which turns
# summation-order differences of 1e-9 in their gradients into 1e-6 in weights; the comparison of
# layouts uses SGD with momentum, whose update is proportional to the gradient.
SGD = "{_target_: torch.optim.SGD, lr: 0.1, momentum: 0.9}"


def write_lm(tmp_path, name, batch, strategy=None, dropout=0.0, extra="", optimizer=ADAMW,
             checkpoint="{every_n_steps: 4, keep_last: 2}"):
    path = tmp_path / f"{name}.yaml"
    text = LM_CONFIG.format(name=name, out=tmp_path / "runs", batch=batch, dropout=dropout, optimizer=optimizer,
                            checkpoint=checkpoint)
    path.write_text(text + (f"strategy: {strategy}\n" if strategy else "") + extra)
    return path


def sharded(directory):
    """A sharded checkpoint's model and optimizer state as full tensors, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = directory.parent.parent / f"{directory.name}-full.pt"
    dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=True)


def test_fsdp_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    # Per rank 3 samples a batch, 2 micro-batches a step; 126 training blocks, 13 validation blocks
    # (7 and 6 per rank: 3 and 2 batches, so one rank runs an uncounted forward to keep FSDP in step).
    best = "callbacks: [{_target_: trainer.callbacks.BestCheckpoints, monitor: val/loss}]\n"
    two = torchrun("run", write_lm(tmp_path, "fsdp", batch=3, strategy="fsdp", optimizer=SGD, extra=best))
    assert two.returncode == 0, two.stderr[-3000:]
    one = single("run", write_lm(tmp_path, "single", batch=6, optimizer=SGD))
    assert one.returncode == 0, one.stderr[-3000:]
    fsdp_dir, single_dir = tmp_path / "runs" / "fsdp", tmp_path / "runs" / "single"

    names = sorted(p.name for p in (fsdp_dir / "checkpoints").iterdir())
    best_name = [n for n in names if n.startswith("best-step-")]
    # directories of shards, rotated like files; the best one by val/loss beside them, and a link to it
    assert names == ["best", *best_name, "step-00000020", "step-00000022"] and len(best_name) == 1
    assert (fsdp_dir / "checkpoints" / "best").resolve() == (fsdp_dir / "checkpoints" / best_name[0]).resolve()
    assert load_checkpoint(fsdp_dir / "checkpoints" / "best")["trainer_state"]["global_step"] in (11, 22)
    assert sorted(p.name for p in (fsdp_dir / "checkpoints" / "step-00000022").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"]
    a = sharded(fsdp_dir / "checkpoints" / "step-00000022")
    b = final(single_dir)
    assert b["trainer_state"]["global_step"] == 22
    assert sorted(a["model"]) == sorted(b["model"])  # the plain module's names: no FSDP prefixes
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6)

    fsdp_records, single_records = records(fsdp_dir), records(single_dir)
    for metric in ("train/loss", "val/loss", "grad_norm/total"):
        got = [(r["step"], r[metric]) for r in fsdp_records if metric in r]
        want = [(r["step"], r[metric]) for r in single_records if metric in r]
        assert [s for s, _ in got] == [s for s, _ in want] and got, metric
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), metric

    # The sharded checkpoint loads in a single process: evaluation gives the run's last val/loss.
    ev = single("eval", write_lm(tmp_path, "single", batch=6, optimizer=SGD), "--checkpoint",
                fsdp_dir / "checkpoints" / "step-00000022")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["val/loss"] == pytest.approx(
        [r["val/loss"] for r in fsdp_records if "val/loss" in r][-1], rel=1e-5)

    # ... and a single process resumes it (DCP reshards) and trains on to the same weights.
    moved = single("run", write_lm(tmp_path, "moved", batch=6, optimizer=SGD), "--resume", fsdp_dir / "checkpoints" / "step-00000020")
    assert moved.returncode == 0, moved.stderr[-3000:]
    for key, value in final(tmp_path / "runs" / "moved")["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6)


EVERY_2 = "{every_n_steps: 2, keep_last: null}"


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_close_drops_the_ddp_wrapper_before_destroying_the_group(mode):
    """Destroyed from DDP's reducer, the group deadlocked at exit in 1 of 25 cold-started runs (the
    main thread, holding the GIL, joined a gloo thread waiting for it); close() drops the wrapper first."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "ddp_script.py"), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: wrapper gone at destroy [True], initialized False" in proc.stdout, proc.stdout


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_from_a_users_script(tmp_path, precision):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "fsdp_script.py"), str(tmp_path / "run"), precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (the two ranks share stdout, so their lines may interleave)
    reports = sorted(re.findall(r"rank (\d): sharded=(\w+) skipped=(\d+) step=(\d+) val/loss=([\d.]+)", proc.stdout))
    assert [r[0] for r in reports] == ["0", "1"], proc.stdout
    # Both ranks sharded, both skipped the step whose loss only rank 1 saw as NaN, and both
    # reported the same validation loss (reduced over the ranks' shares).
    assert all(r[1:4] == ("True", "1", "6") for r in reports), reports
    assert reports[0][4] == reports[1][4]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000006"]


def test_fsdp_refuses_fused_sgd_with_the_reason(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "fsdp_script.py"), str(tmp_path / "run"), "fp32", "fused_sgd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env())
    assert proc.returncode != 0
    assert "fused SGD has no kernel for sharded parameters" in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    """An uninterrupted 2-rank fsdp run with dropout (every rank draws from torch's generator)."""
    tmp = tmp_path_factory.mktemp("fsdp_reference")
    proc = torchrun("run", write_lm(tmp, "ref", batch=3, strategy="fsdp", dropout=0.1, checkpoint=EVERY_2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("where,step,resumes_from", [
    ("after_step", 10, 8),  # step 8 is inside the log interval (6, 9]: each rank's partial loss sum counts
    ("during_save", 8, 6),  # rank 0 killed half-way through trainer.pt: the step-8 directory never appears
])
def test_killed_fsdp_run_resumes_bit_identically(fsdp_reference, tmp_path, where, step, resumes_from):
    marker = tmp_path / "killed"
    kill = f"callbacks:\n  - {{_target_: killers.KillAt, where: {where}, step: {step}, marker: '{marker}'}}\n"
    cfg = write_lm(tmp_path, "ref2", batch=3, strategy="fsdp", dropout=0.1, checkpoint=EVERY_2, extra=kill)
    first = torchrun("run", cfg)
    assert first.returncode != 0 and marker.exists()
    checkpoints = tmp_path / "runs" / "ref2" / "checkpoints"
    assert list_checkpoints(checkpoints)[-1].name == f"step-{resumes_from:08d}"
    second = torchrun("run", cfg, "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"continuing from {checkpoints / f'step-{resumes_from:08d}'}" in second.stdout
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # the half-written one is gone

    a = sharded(fsdp_reference / "checkpoints" / "step-00000022")
    b = sharded(checkpoints / "step-00000022")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert sorted(a["optimizer"]) == sorted(b["optimizer"]) and a["optimizer"]
    for name, state in a["optimizer"].items():  # {parameter name: {exp_avg, exp_avg_sq, step}}
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"][name][key]), (name, key)
    loss = lambda d: [(r["step"], r["train/loss"]) for r in records(d) if "train/loss" in r]
    assert loss(tmp_path / "runs" / "ref2") == loss(fsdp_reference)


@pytest.fixture
def fsdp_checkpoints(fsdp_reference, tmp_path):
    """A copy of the reference run's checkpoint directories, to damage."""
    import shutil

    directory = tmp_path / "run" / "checkpoints"
    shutil.copytree(fsdp_reference / "checkpoints", directory)
    return directory


@pytest.mark.parametrize("damage", ["truncated_shard", "flipped_shard", "missing_shard", "no_trainer_state"])
def test_damaged_sharded_checkpoint_falls_back_to_the_previous(fsdp_checkpoints, damage):
    newest = list_checkpoints(fsdp_checkpoints)[-1]
    if damage == "flipped_shard":  # rank 1 hashed this file; rank 0 listed its digest
        shard = newest / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        expected = "__1_0.distcp does not match the SHA-256 digest"
    elif damage == "truncated_shard":
        shard = newest / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
        expected = "__1_0.distcp holds 100 bytes"
    elif damage == "missing_shard":
        (newest / "__0_0.distcp").unlink()
        expected = "__0_0.distcp is missing"
    else:
        (newest / "trainer.pt").unlink()
        expected = "not a complete sharded checkpoint"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=newest.name):
        state = find_resume_checkpoint(fsdp_checkpoints.parent, "auto")
    assert state["trainer_state"]["global_step"] == 20 and state["sharded"] == str(fsdp_checkpoints / "step-00000020")


def test_sharded_metadata_that_would_run_code_is_refused(fsdp_checkpoints, tmp_path):
    import hashlib
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    newest = list_checkpoints(fsdp_checkpoints)[-1]
    payload = pickle.dumps(Payload())
    (newest / ".metadata").write_bytes(payload)
    # A forger would list the new size and digest in trainer.pt too (plain data, weights_only).
    state = torch.load(newest / "trainer.pt", weights_only=True)
    state["shards"][".metadata"] = len(payload)
    state["shard_sha256"][".metadata"] = hashlib.sha256(payload).hexdigest()
    torch.save(state, newest / "trainer.pt")
    with pytest.raises(CheckpointError, match="posix.system is not allowed.*refused"):
        load_checkpoint(newest)
    assert not (tmp_path / "pwned").exists()
