"""torchrun with two CPU ranks (gloo) on loopback, as a user launches it."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROJECT = Path(__file__).resolve().parent / "project"

CONFIG = """\
name: {name}
out_dir: {out}
seed: 5
max_epochs: 3
batch_size: {batch}
log_every_n_steps: 1
progress_bar: false
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


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    two = torchrun("run", write(tmp_path, "ddp", batch=8))
    assert two.returncode == 0, two.stderr[-3000:]
    one = single("run", write(tmp_path, "single", batch=16))
    assert one.returncode == 0, one.stderr
    ddp_dir, single_dir = tmp_path / "runs" / "ddp", tmp_path / "runs" / "single"

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
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv", "metrics.jsonl",
                                                        "status.json"]
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["step-00000020.pt", "step-00000024.pt"]
    # A DDP checkpoint holds the plain module's keys, so it loads in a single process.
    assert not any(k.startswith("module.") for k in a["model"])


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


def test_a_rank_that_raises_ends_the_job_quickly(tmp_path):
    cfg = write(tmp_path, "fail", batch=8, extra="trainer: {_target_: killers.FailOnRank, rank: 1, step: 3}\n")
    start = time.monotonic()
    proc = torchrun("run", cfg, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 1 fails at step 3" in proc.stdout + proc.stderr
    assert elapsed < 60
