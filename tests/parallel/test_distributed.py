"""torchrun with two CPU ranks (gloo) on loopback, as a user launches it."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from helpers import PROJECT, in_process, loopback_ok, process_env, project_config, project_module, reserved_port
from trainer.checkpoint import CheckpointError, find_resume_checkpoint, list_checkpoints, load_checkpoint

# The test project (helpers.PROJECT_CONFIG) for three epochs of AdamW: 24 steps at a global batch of 16.
DDP = dict(seed=5, max_steps=None, max_epochs=3, log_every_n_steps=1, checkpoint={"every_n_steps": 4, "keep_last": 2},
           model={"hidden": 32}, data={"n_train": 128, "n_val": 50},
           optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-2})

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not loopback_ok(), reason="this machine cannot open loopback sockets between processes"),
]


def torchrun(*args, timeout=240, **environ):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=process_env(**environ))


def single(*args, timeout=240):
    """``trainer ARGS`` in one process of its own: for a run that is killed, or that sets up a process group."""
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=process_env())


def write(tmp_path, name, batch, extra="", **changes):
    """``name``.yaml: DDP's config with ``changes`` (as helpers.project_config takes them), then ``extra``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(project_config(DDP, name=name, out_dir=str(tmp_path / "runs"), batch_size=batch, **changes) + extra)
    return path


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


@pytest.fixture(scope="module")
def one_process(shared_run):
    """The run of one process with twice the batch (16), which two ranks of 8 must match; made once."""

    def make(folder):
        one = in_process("run", write(folder, "single", batch=16))
        assert one.returncode == 0, one.stderr

    return shared_run("distributed.one_process", make) / "runs" / "single"


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
    cfg = write(tmp_path, "nodes", batch=8, extra="profile: {start_step: 2, steps: 1}\n")
    # Each agent's output goes to a file: a pipe that is not read while the test waits on the
    # other agent could fill and stall both.
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    files = [log.open("w") for log in logs]
    with reserved_port() as port:  # held until the agents are done: no other test's socket takes it
        agents = [
            subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                              "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                              "--rdzv_id=nodes-test", "-m", "trainer", "run", str(cfg)],
                             stdout=file, stderr=subprocess.STDOUT, env=process_env())
            for node, file in zip((0, 1), files)
        ]
        for file in files:
            file.close()  # each agent holds its own copy
        for agent, log in zip(agents, logs):
            agent.wait(timeout=240)
            assert agent.returncode == 0, log.read_text()[-3000:]
    a, b = final(tmp_path / "runs" / "nodes"), final(one_process)
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in records(tmp_path / "runs" / "nodes") if "train/loss" in r] == list(range(1, 25))
    # One trace per rank, named by its global rank (both ranks are local rank 0 here).
    traces = sorted((tmp_path / "runs" / "nodes" / "profile").iterdir())
    assert [p.name.split(".")[0] for p in traces] == ["rank0", "rank1"]
    for trace in traces:
        assert "ProfilerStep#2" in {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}


def test_srun_without_torchrun_trains_its_tasks_as_the_ranks_of_one_job(tmp_path, one_process):
    # `srun --ntasks=2 python -m trainer run cfg.yaml`: two tasks of one step, SLURM's variables only.
    cfg = write(tmp_path, "srun", batch=8)
    slurm_vars = {name: value for name, value in os.environ.items() if name.startswith(("SLURM_", "MASTER_"))}
    logs = [tmp_path / f"task{task}.log" for task in (0, 1)]
    files = [log.open("w") for log in logs]
    with reserved_port() as port:
        env = {**{k: v for k, v in process_env().items() if k not in slurm_vars and k not in ("RANK", "WORLD_SIZE")},
               "SLURM_JOB_ID": "777", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}
        tasks = [subprocess.Popen([sys.executable, "-m", "trainer", "run", str(cfg)], stdout=file,
                                  stderr=subprocess.STDOUT,
                                  env={**env, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)})
                 for task, file in zip((0, 1), files)]
        for file in files:
            file.close()
        for task, log in zip(tasks, logs):
            task.wait(timeout=240)
            assert task.returncode == 0, log.read_text()[-3000:]
    srun_dir = tmp_path / "runs" / "srun"
    a, b = final(srun_dir), final(one_process)
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6)
    # One job: rank 0 alone wrote a record per step, the loss averaged over the two tasks.
    losses = [r["train/loss"] for r in records(srun_dir) if "train/loss" in r]
    assert losses == pytest.approx([r["train/loss"] for r in records(one_process) if "train/loss" in r], rel=1e-5)
    said = [log.read_text() for log in logs]
    assert "finished: step 24" in said[0] and "finished: step 24" not in said[1]  # rank 0 alone reports


def test_fewer_validation_samples_than_ranks(tmp_path):
    # One validation sample: rank 1's share is empty; it adds zeros to the exact reduction.
    def cfg(name, batch):
        return write(tmp_path, name, batch=batch, data={"n_val": 1}, max_epochs=1)

    two = torchrun("run", cfg("ddp", 8))
    assert two.returncode == 0, two.stderr[-3000:]
    one = in_process("run", cfg("single", 16))
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
    # Far more epochs than it can run before the signal, however late a loaded machine lets the test
    # look (with 500 a run could finish first, and the signal then hit an exited process).
    write(tmp_path, "term", batch=8, max_epochs=1000000, log_every_n_steps=5, checkpoint={"every_n_steps": 100000})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", "run", str(tmp_path / "term.yaml")]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=process_env(PYTHONFAULTHANDLER="1"))
    run_dir = tmp_path / "runs" / "term"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= 4):
        time.sleep(0.2)
    workers = _worker_pids(agent.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGTERM)  # rank 1 alone is told to stop
    try:
        out, err = agent.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in _worker_pids(agent.pid).values():
            os.kill(pid, signal.SIGABRT)  # each rank prints its Python stacks (PYTHONFAULTHANDLER)
        out, err = agent.communicate(timeout=60)
        pytest.fail(f"the job did not end within 120 s of the signal; the ranks' stacks:\n{err[-12000:]}")

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
    # Rank 0 waits in a collective that rank 1 never joins: the job must end when rank 1 exits, not
    # when that collective times out, which is set to an hour here (a hang outlasts the 240 s limit).
    proc = torchrun("run", cfg, timeout=240, TRAINER_DIST_TIMEOUT="3600")
    assert proc.returncode != 0
    assert "rank 1 fails at step 3" in proc.stdout + proc.stderr


def _elastic_config(tmp_path, name, extra=""):
    """128 samples, global batch 16 (8 a rank on two ranks): 8 steps an epoch, two epochs; a log point
    every 4 steps and a checkpoint every 3, so that each resume starts inside a log interval."""
    return write(tmp_path, name, batch=8, extra=extra, max_epochs=2, log_every_n_steps=4,
                 checkpoint={"every_n_steps": 3, "keep_last": None})


def test_a_run_moves_from_two_ranks_to_one_and_back_keeping_its_global_batch(tmp_path):
    """Killed on two ranks after step 7, resumed in one process from step 6 (grad_accum_steps 1 -> 2,
    said in one line), killed after step 11, resumed on two ranks from step 9 (the checkpoint records
    the accumulation it trained with): every step takes the samples the uninterrupted two-rank run
    takes, and the losses and weights match it within float32 summation-order differences."""
    from trainer.data.sources import epoch_permutation

    reference = torchrun("run", _elastic_config(tmp_path, "ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    seen = tmp_path / "seen"
    kills = "".join(f"  - {{_target_: killers.KillAt, where: after_step, step: {step}, marker: '{tmp_path / name}'}}\n"
                    for step, name in ((7, "first"), (11, "second")))
    cfg = _elastic_config(tmp_path, "moved", f"callbacks:\n{kills}  - {{_target_: seen.SeenSamples, out: '{seen}'}}\n")
    first = torchrun("run", cfg)
    assert first.returncode != 0 and (tmp_path / "first").exists()

    refused = single("run", cfg, "--resume", "auto", "on_world_size_change=error")  # (a KillAt waits in cfg)
    assert refused.returncode == 2
    assert ("was trained with a global batch of 16 = batch_size 8 x grad_accum_steps 1 x 2 ranks; on 1 rank this "
            "config makes it 8 (on_world_size_change: error): set grad_accum_steps: 2 or batch_size: 16 to keep it"
            ) in refused.stderr, refused.stderr[-3000:]

    second = single("run", cfg, "--resume", "auto")
    assert second.returncode != 0 and (tmp_path / "second").exists(), second.stderr[-3000:]
    assert ("trainer: resumed on 1 rank a run trained on 2 ranks: grad_accum_steps 1 -> 2 keeps its global batch "
            "of 16 = batch_size 8 x grad_accum_steps 2 x 1 rank (on_world_size_change: scale_accumulation)"
            ) in second.stdout, second.stdout[-3000:]
    checkpoints = tmp_path / "runs" / "moved" / "checkpoints"
    written = load_checkpoint(checkpoints / "step-00000009.pt")  # by the one process: as it trained
    assert {k: written["trainer_state"][k] for k in ("world_size", "batch_size", "grad_accum_steps")} == {
        "world_size": 1, "batch_size": 8, "grad_accum_steps": 2}
    assert written["config"]["grad_accum_steps"] == 1  # the config as written

    third = torchrun("run", cfg, "--resume", "auto")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "continuing from" in third.stdout and "step-00000009.pt" in third.stdout
    assert "trainer: resumed on" not in third.stdout  # the config's values keep the global batch: nothing to set
    assert "grad_accum_steps: 2 -> 1; world_size: 1 -> 2" in third.stdout, third.stdout[-3000:]
    assert "last, short step" not in second.stderr + third.stderr  # 128 samples: 8 full steps an epoch

    # Each step's samples, from the segment that went on to be resumed: the epoch's permutation in
    # slices of the global batch, each sample of an epoch once, whatever the ranks.
    kept = {2: lambda s: s <= 6, 1: lambda s: 7 <= s <= 9}
    by_step: dict[int, list[int]] = {}
    for path in seen.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            segment_keeps = kept[1] if r["world"] == 1 else (kept[2] if r["step"] <= 7 else lambda s: s >= 10)
            if segment_keeps(r["step"]):
                assert r["accum"] == (2 if r["world"] == 1 else 1) and len(r["ids"]) == 8
                by_step.setdefault(r["step"], []).extend(r["ids"])
    assert sorted(by_step) == list(range(1, 17))
    for step, ids in by_step.items():
        epoch, k = divmod(step - 1, 8)
        assert sorted(ids) == sorted(epoch_permutation(128, 5, epoch, True)[16 * k:16 * (k + 1)].tolist()), step

    # float32 sums in another order (one process adds two micro-batches' gradients where two ranks
    # average theirs): differences of a few ulps, the tolerance of the existing layout comparisons.
    ref_dir, moved_dir = tmp_path / "runs" / "ref", tmp_path / "runs" / "moved"
    for metric in ("train/loss", "val/loss"):
        want = [(r["step"], r[metric]) for r in records(ref_dir) if metric in r]
        got = [(r["step"], r[metric]) for r in records(moved_dir) if metric in r]
        assert [s for s, _ in got] == [s for s, _ in want] and want, metric
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), metric
    a, b = final(ref_dir), final(moved_dir)
    assert b["trainer_state"]["global_step"] == 16 and b["trainer_state"]["grad_accum_steps"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6)


def test_a_resume_on_one_rank_warns_that_an_epochs_short_last_step_differs(tmp_path):
    """100 samples at a global batch of 16: the epoch's last step is 2 samples a rank on two ranks
    (their mean) and one micro-batch of 4 in one process accumulating two (its mean halved)."""
    cfg = write(tmp_path, "short", batch=8, max_epochs=None, max_steps=3, data={"n_train": 100},
                checkpoint={"every_n_steps": 2, "keep_last": None})
    first = torchrun("run", cfg, "max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = in_process("run", cfg, "--resume", "auto")  # one process: no group
    assert second.returncode == 0, second.stderr[-3000:]
    assert ("resumed with a global batch of 16 = batch_size 8 x grad_accum_steps 2 x 1 rank a run trained with 16 = "
            "batch_size 8 x grad_accum_steps 1 x 2 ranks: its 100 samples per epoch do not divide by it"
            ) in second.stderr, second.stderr[-3000:]
    assert second.stderr.count("last, short step") == 1


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

    with tempfile.TemporaryDirectory() as folder:  # not beside it: a shared reference run is only read
        out = Path(folder) / f"{directory.name}-full.pt"
        dcp_to_torch_save(directory, out)
        return torch.load(out, weights_only=True)


def test_fsdp_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    # Per rank 3 samples a batch, 2 micro-batches a step; 126 training blocks, 13 validation blocks
    # (7 and 6 per rank: 3 and 2 batches, so one rank runs an uncounted forward to keep FSDP in step).
    # The sharded run also recomputes its blocks' activations in backward (applied before sharding,
    # each block gathers its parameters again for the recompute): the same gradients, the same names.
    best = "callbacks: [{_target_: trainer.callbacks.BestCheckpoints, monitor: val/loss}]\n"
    extra = best + "activation_checkpointing: [Block]\n"
    two = torchrun("run", write_lm(tmp_path, "fsdp", batch=3, strategy="fsdp", optimizer=SGD, extra=extra))
    assert two.returncode == 0, two.stderr[-3000:]
    one = in_process("run", write_lm(tmp_path, "single", batch=6, optimizer=SGD))
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
    ev = in_process("eval", write_lm(tmp_path, "single", batch=6, optimizer=SGD), "--checkpoint",
                    fsdp_dir / "checkpoints" / "step-00000022")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["val/loss"] == pytest.approx(
        [r["val/loss"] for r in fsdp_records if "val/loss" in r][-1], rel=1e-5)

    # ... and a single process resumes it with the same config (DCP reshards; grad_accum_steps 2 -> 4
    # keeps the global batch) and trains on to the same weights ...
    every = "{every_n_steps: 1, keep_last: null}"
    moved = in_process("run", write_lm(tmp_path, "moved", batch=3, strategy="fsdp", optimizer=SGD, checkpoint=every),
                       "--resume", fsdp_dir / "checkpoints" / "step-00000020")  # one process: no group
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "grad_accum_steps 2 -> 4 keeps its global batch of 12" in moved.stdout, moved.stdout[-3000:]
    for key, value in final(tmp_path / "runs" / "moved")["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6)
    # ... whose file checkpoint two fsdp ranks resume, each taking its shards of every tensor.
    back = torchrun("run", write_lm(tmp_path, "back", batch=3, strategy="fsdp", optimizer=SGD),
                    "--resume", tmp_path / "runs" / "moved" / "checkpoints" / "step-00000021.pt")
    assert back.returncode == 0, back.stderr[-3000:]
    assert "grad_accum_steps: 4 -> 2;" in back.stdout and "world_size: 1 -> 2" in back.stdout, back.stdout[-3000:]
    c = sharded(tmp_path / "runs" / "back" / "checkpoints" / "step-00000022")
    for key, value in a["model"].items():
        torch.testing.assert_close(c["model"][key], value, rtol=1e-5, atol=1e-6)


EVERY_2 = "{every_n_steps: 2, keep_last: null}"


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_close_drops_the_ddp_wrapper_before_destroying_the_group(mode):
    """Destroyed from DDP's reducer, the group deadlocked at exit in 1 of 25 cold-started runs (the
    main thread, holding the GIL, joined a gloo thread waiting for it); close() drops the wrapper first."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "ddp_script.py"), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: wrapper gone at destroy [True], initialized False" in proc.stdout, proc.stdout


@pytest.mark.parametrize("precision,held", [("fp32", "torch.float32"), ("bf16", "torch.float32"),
                                            ("bf16-true", "torch.bfloat16")])
def test_fsdp_from_a_users_script(tmp_path, precision, held):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "fsdp_script.py"), str(tmp_path / "run"), precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (the two ranks share stdout: each line is written whole, in any order)
    reports = sorted(re.findall(r"rank (\d): sharded=(\w+) skipped=(\d+) step=(\d+) val/loss=([\d.]+) "
                                r"checkpointed=(\S+) as (\S+) held=((?:torch\.b?float\d+,?)+)", proc.stdout))
    assert [r[0] for r in reports] == ["0", "1"], proc.stdout
    # Both ranks sharded, both skipped the step whose loss only rank 1 saw as NaN, and both
    # reported the same validation loss (reduced over the ranks' shares).
    assert all(r[1:4] == ("True", "1", "6") for r in reports), reports
    assert reports[0][4] == reports[1][4]
    # Each sharded block (FSDP2's own class for it) recomputes its activations in backward.
    assert all(r[5:7] == ("blocks.0,blocks.1", "FSDPBlock,FSDPBlock") for r in reports), reports
    # bf16 keeps fp32 shards (FSDP gathers them in bf16); bf16-true shards bf16 parameters, and the
    # optimizer's state follows them.
    assert all(r[7] == held for r in reports), reports
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000006"]


def test_fsdp_refuses_fused_sgd_with_the_reason(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "fsdp_script.py"), str(tmp_path / "run"), "fp32", "fused_sgd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=process_env())
    assert proc.returncode != 0
    assert "fused SGD has no kernel for sharded parameters" in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def fsdp_reference(shared_run):
    """An uninterrupted 2-rank fsdp run with dropout (every rank draws from torch's generator); made once."""

    def make(folder):
        proc = torchrun("run", write_lm(folder, "ref", batch=3, strategy="fsdp", dropout=0.1, checkpoint=EVERY_2))
        assert proc.returncode == 0, proc.stderr[-3000:]
        # Validation (and the sanity pass's validation batch) leaves every parameter sharded: the optimizer's.
        assert "the optimizer does not hold them" not in proc.stderr, proc.stderr[-3000:]

    return shared_run("distributed.fsdp_reference", make) / "runs" / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("where,step,resumes_from", [
    ("after_step", 10, 8),  # step 8 is inside the log interval (6, 9]: each rank's partial loss sum counts
    ("during_save", 8, 6),  # rank 0 killed half-way through trainer.pt: the step-8 directory never appears
    ("during_async_write", 8, 6),  # the same in the background (checkpoint.async), the loop at step 9
])
def test_killed_fsdp_run_resumes_bit_identically(fsdp_reference, tmp_path, where, step, resumes_from):
    marker = tmp_path / "killed"
    kill = f"callbacks:\n  - {{_target_: killers.KillAt, where: {where}, step: {step}, marker: '{marker}'}}\n"
    every = ASYNC_EVERY_2 if where == "during_async_write" else EVERY_2
    cfg = write_lm(tmp_path, "ref2", batch=3, strategy="fsdp", dropout=0.1, checkpoint=every, extra=kill)
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


ASYNC_EVERY_2 = "{every_n_steps: 2, keep_last: null, async: true}"


def test_fsdp_checkpoints_written_in_the_background_are_the_state_at_their_step(fsdp_reference, tmp_path):
    # dcp.async_save copies each rank's shards; the files of step 4 are written only after step 5,
    # and every checkpoint equals the synchronous run's, with the digests of every shard.
    hold = f"callbacks: [{{_target_: killers.HoldShards, step: 4, marker: '{tmp_path / 'held'}'}}]\n"
    proc = torchrun("run", write_lm(tmp_path, "ref", batch=3, strategy="fsdp", dropout=0.1, checkpoint=ASYNC_EVERY_2,
                                    extra=hold))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("held.*")) == ["held.0", "held.1"]
    checkpoints = tmp_path / "runs" / "ref" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in list_checkpoints(checkpoints)] == [
        p.name for p in list_checkpoints(fsdp_reference / "checkpoints")]
    for step in (4, 22):
        name = f"step-{step:08d}"
        a, b = sharded(fsdp_reference / "checkpoints" / name), sharded(checkpoints / name)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (step, key)
        for param, state in a["optimizer"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizer"][param][key]), (step, param, key)
        saved = load_checkpoint(checkpoints / name)  # checks every shard against its digest
        assert sorted(saved["shard_sha256"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert saved["trainer_state"] == load_checkpoint(fsdp_reference / "checkpoints" / name)["trainer_state"]


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


def test_export_consolidates_the_two_ranks_shards_into_one_file(fsdp_reference, tmp_path):
    from safetensors.torch import load_file

    from trainer.evaluation.export import build_model

    proc = in_process("export", fsdp_reference, "--out", tmp_path / "lm.safetensors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from {fsdp_reference / 'checkpoints' / 'step-00000022'}" in proc.stdout
    expected = sharded(fsdp_reference / "checkpoints" / "step-00000022")["model"]
    exported = load_file(tmp_path / "lm.safetensors")
    assert exported.keys() == expected.keys() and {"tok.weight", "head.weight"} <= exported.keys()  # tied
    assert all(torch.equal(exported[key], value) for key, value in expected.items())
    model = build_model(tmp_path / "lm.yaml")
    model.load_state_dict(exported, strict=True)
    assert model.head.weight is model.tok.weight


def test_fsdp_init_from_fills_each_ranks_shards_as_one_process_loads(tmp_path):
    """init_from under fsdp: the model is built on the meta device (from a function and from a YAML
    config) and each rank fills its own shards from the file; gathered before step 1, the model equals
    the one a single process loads, exactly, for every kind of file. A resume continues from its checkpoint."""
    import shutil

    import safetensors.torch

    from trainer import Trainer, read_weights
    from trainer.examples.char_lm import lm_loss, load

    rotary_lm = project_module("fsdp_script").rotary_lm

    files = tmp_path / "weights"
    files.mkdir()
    torch.manual_seed(1)
    tied = rotary_lm().state_dict()
    assert tied["head.weight"] is not None and torch.equal(tied["head.weight"], tied["tok.weight"])
    # safetensors stores a tied tensor once (head.weight is tok.weight)
    safetensors.torch.save_file({k: v for k, v in tied.items() if k != "head.weight"}, files / "weights.safetensors")
    torch.manual_seed(2)
    torch.save(rotary_lm().state_dict(), files / "state_dict.pt")
    torch.manual_seed(3)
    torch.save({f"old.{k}": v for k, v in rotary_lm().state_dict().items()}, files / "renamed.pt")
    data = load(block_size=16, max_bytes=2240, val_fraction=0.1)
    Trainer(rotary_lm, lambda params: torch.optim.AdamW(params, lr=3e-3), data["train"], loss_fn=lm_loss,
            run_dir=tmp_path / "one", config={"seed": 4, "max_steps": 1, "batch_size": 4, "progress": "off"}).fit()
    shutil.copy(list_checkpoints(tmp_path / "one" / "checkpoints")[-1], files / "checkpoint.pt")

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "fsdp_script.py"), "init_from", str(out), str(files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    names = ["safetensors", "state_dict", "checkpoint", "sharded", "resumed", "yaml"]
    for name in names:  # every rank built the model without memory and holds shards; the RoPE-like table is set
        for rank in (0, 1):
            assert f"rank {rank} {name}: built_on=meta sharded=True angles=True" in proc.stdout, proc.stdout

    def loaded_by_one_process(init_from):
        trainer = Trainer(rotary_lm, lambda params: torch.optim.AdamW(params, lr=3e-3),
                          config={"init_from": init_from, "progress": "off"})
        assert trainer.apply_init_from() is not None
        return trainer.module.state_dict()

    first = out / "a" / "checkpoints" / "step-00000002"
    expected = {
        "safetensors": loaded_by_one_process(str(files / "weights.safetensors")),
        "state_dict": loaded_by_one_process(str(files / "state_dict.pt")),
        "checkpoint": loaded_by_one_process(str(files / "checkpoint.pt")),
        "sharded": loaded_by_one_process(str(first)),
        "resumed": read_weights(first),  # the checkpoint's weights, not init_from's state_dict.pt
        "yaml": loaded_by_one_process({"path": str(files / "renamed.pt"), "rename": {"old.": ""}}),
    }
    assert not torch.equal(expected["resumed"]["tok.weight"], expected["state_dict"]["tok.weight"])
    assert not torch.equal(expected["safetensors"]["tok.weight"], expected["state_dict"]["tok.weight"])
    for name in names:
        gathered = torch.load(out / f"{name}.pt", weights_only=True)
        assert sorted(gathered) == sorted(expected[name]), name
        for key, value in expected[name].items():
            assert torch.equal(gathered[key], value), (name, key)


def test_summed_losses_give_the_gradient_of_the_whole_batchs_token_mean():
    """Two ranks with different numbers of valid tokens, each over two micro-batches, under DDP
    and FSDP: the first step's gradients are those of one process's per-token mean over the whole
    global batch, train/loss and val/loss are that mean, and the run adds exactly one scalar
    all-reduce per optimizer step. The same runs with per-micro-batch mean losses miss all of it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "tokens_script.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (the two ranks share stdout: each line is written whole, in any order)
    lines = re.findall(r"rank (\d) (\w+) (\w+): grads_match=(\w+) train_loss=([\d.]+) val_loss=([\d.]+) "
                       r"mean=([\d.]+) scalar_all_reduces=(\d+)", proc.stdout)
    assert sorted((r[0], r[1], r[2]) for r in lines) == sorted(
        (rank, strategy, kind) for rank in "01" for strategy in ("ddp", "fsdp") for kind in ("summed", "mean")), proc.stdout
    for rank, strategy, kind, match, train, val, mean, reduces in lines:
        if kind == "summed":
            assert match == "True", (rank, strategy)
            assert float(train) == pytest.approx(float(mean), rel=1e-6) and float(val) == pytest.approx(float(mean), rel=1e-6)
            assert reduces == "3"  # three optimizer steps
        else:
            assert match == "False" and float(train) != pytest.approx(float(mean), rel=1e-4) and reduces == "0"


def test_manual_step_on_two_ranks_matches_one_process_with_twice_the_batch(tmp_path):
    """Two optimizers stepped by ``manual_step`` with accumulation and clipping: each optimizer's
    gradients are averaged over the ranks at its step, so two ranks of 8 train as one process of 16,
    and the logged losses are the means over the ranks. strategy: fsdp is refused on every rank."""
    script = str(PROJECT / "manual_script.py")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          script, str(tmp_path), "ddp", "8"], capture_output=True, text=True, timeout=240, env=process_env())
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("fsdp refused: manual_step under strategy: fsdp") == 2, two.stdout
    project_module("manual_script").main(tmp_path, "single", 16)  # the script as one process runs it: no group
    ddp, single_run = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("ddp", "single"))
    assert (ddp["world_size"], single_run["world_size"], ddp["step"], single_run["step"]) == (2, 1, 6, 6)
    for key, value in single_run["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ddp["optimizers"], single_run["optimizers"]):
        torch.testing.assert_close(mine["state"], theirs["state"], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in ddp["history"]] == [3, 6]
    for mine, theirs in zip(ddp["history"], single_run["history"]):
        assert mine["train/a_loss"] == pytest.approx(theirs["train/a_loss"], rel=1e-5)
        assert mine["train/b_loss"] == pytest.approx(theirs["train/b_loss"], rel=1e-5)
