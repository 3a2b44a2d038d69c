"""configs/gan.yaml (two optimizers, GANTrainer.manual_step) killed with SIGKILL mid-run and resumed
with --resume auto ends with the uninterrupted run's weights, optimizer states and metric history."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, in_process, process_env
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.observability.timing import is_timing

SMALL = ["max_steps=40", "log_every_n_steps=10", "eval_every_n_steps=20", "checkpoint.every_n_steps=15",
         "batch_size=64", "model.hidden=32", "data.n_train=1024", "data.n_val=128", "progress=off"]


def run(*args):
    """``trainer ARGS`` as a real process, which the test kills."""
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], env=process_env(), capture_output=True,
                          text=True, timeout=300)


def config(tmp_path, extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "gan.yaml"
    path.write_text((ROOT / "configs" / "gan.yaml").read_text() + f"out_dir: {tmp_path / 'runs'}\n" + extra)
    return path


def files(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not is_timing(k)} for line in lines]


@pytest.mark.slow
def test_gan_killed_mid_run_resumes_to_the_uninterrupted_runs_weights_and_metrics(tmp_path):
    whole = in_process("run", config(tmp_path / "whole"), *SMALL)
    assert whole.returncode == 0, whole.stderr
    marker = tmp_path / "cut" / "fired"
    kill = f"callbacks:\n  - {{_target_: killers.KillAt, where: after_step, step: 23, marker: '{marker}'}}\n"
    cut_config = config(tmp_path / "cut", kill)
    first = run("run", cut_config, *SMALL)
    assert first.returncode == -signal.SIGKILL and marker.exists(), first.stderr
    second = in_process("run", cut_config, *SMALL, "--resume", "auto")
    assert second.returncode == 0, second.stderr

    a_dir, b_dir = tmp_path / "whole" / "runs" / "gan", tmp_path / "cut" / "runs" / "gan"
    assert records(b_dir) == records(a_dir)
    assert {"train/d_loss", "train/g_loss", "lr/1"} <= set(records(a_dir)[0])
    a, b = (load_checkpoint(list_checkpoints(d / "checkpoints")[-1]) for d in (a_dir, b_dir))
    assert a["trainer_state"]["global_step"] == b["trainer_state"]["global_step"] == 40
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    assert len(a["optimizer"]) == 2
    for mine, theirs in zip(b["optimizer"], a["optimizer"]):
        for index, state in theirs["state"].items():
            for name, value in state.items():
                assert torch.equal(mine["state"][index][name], value), (index, name)
    assert (b_dir / "samples.png").stat().st_size > 1000


def test_a_resume_with_the_optimizers_parameters_swapped_is_refused_in_one_line(tmp_path, run_cli):
    # Each network would go on with the other's Adam state: in a real process, since a fused kernel
    # given state of another shape may crash it rather than raise.
    cfg = config(tmp_path)
    first = in_process("run", cfg, *SMALL, "max_steps=15")
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs" / "gan"
    before = files(run_dir)
    swapped = run_cli("run", cfg, *SMALL, "optimizers.generator.params=discriminator.*",
                      "optimizers.discriminator.params=generator.*", "--resume", "auto")
    assert swapped.returncode == 2, swapped.stderr
    [line] = swapped.stderr.strip().splitlines()
    checkpoint = run_dir / "checkpoints" / "step-00000015.pt"
    assert line.startswith(
        f"error: checkpoint {checkpoint}: optimizer 'generator' of the checkpoint trains generator.* (6 tensors), "
        "this run's trains discriminator.* (6 tensors) (only the checkpoint's trains generator.0.weight, ")
    assert line.endswith(
        "the optimizers' parameters must match to resume their state: set optimizers.generator.params back to "
        f"'generator.*', as the run was started, or start a new run from its weights (init_from: {checkpoint})")
    assert files(run_dir) == before
