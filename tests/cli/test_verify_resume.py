"""trainer verify-resume: a config that resumes exactly verifies; one with state outside the checkpoint
is a finding naming the step where the runs part and what parted; a config error is one line, exit 2.
The runs it compares are real processes, really killed."""

import re
import shutil
from pathlib import Path

import pytest

from helpers import in_process, process_env, project_config

# Eight steps of two micro-batches: one SIGKILL (inside an accumulation window) and one SIGTERM.
TINY = dict(max_steps=8, batch_size=8, grad_accum_steps=2, log_every_n_steps=4)


def verify(tmp_path, text, *args):
    (tmp_path / "cfg.yaml").write_text(text)
    # The runs it starts import this checkout and tests/project.
    return in_process("verify-resume", "cfg.yaml", "--kills", "1", *args, cwd=tmp_path,
                      env={"PYTHONPATH": process_env()["PYTHONPATH"]})


@pytest.mark.slow
@pytest.mark.process
def test_a_config_that_resumes_exactly_verifies(tmp_path):
    result = verify(tmp_path, project_config(TINY, out_dir=str(tmp_path / "mine")))
    assert result.returncode == 0, result.output
    assert "SIGKILL after the first micro-batch of step" in result.stdout and "SIGTERM after step" in result.stdout
    assert result.stdout.count("same batches and logged values") == 3  # the parts ended by each stop, and the last
    assert "final checkpoints (step 8): weights, optimizer, scheduler" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("verdict: resume is exact: 1 SIGKILL and a SIGTERM")
    assert not (tmp_path / "mine").exists()  # the user's runs are never touched: out_dir is overridden
    assert not Path(re.search(r"runs in (\S+)", result.stdout).group(1)).exists()  # removed once verified


@pytest.mark.slow
@pytest.mark.process
def test_state_outside_the_checkpoint_is_a_finding_at_the_step_where_the_runs_part(tmp_path):
    model = {"_target_": "hidden_state.CountingMLP", "in_features": 16, "out_features": 4, "hidden": 8}
    result = verify(tmp_path, project_config(TINY, model=model), "--seed", "3")
    work = Path(re.search(r"runs in (\S+)", result.stdout).group(1))
    try:
        assert result.returncode == 1, result.output
        verdict = result.stdout.splitlines()[-2]
        found = re.search(r"verdict: NOT EXACT: the runs part at step (\d+), in run \d+, resumed from the checkpoint "
                          r"of step (\d+)( \(the first step it trained\))?: (\S+): ", verdict)
        assert found, verdict
        # At the checkpoint's own step (its epoch-end validation runs again) or the first step trained after it.
        step, start = int(found.group(1)), int(found.group(2))
        assert step == start + 1 and found.group(4) == "train/loss" or step == start and found.group(4) == "val/loss"
        assert "the batches were the same" in verdict and "register_buffer" in verdict
        assert f"the runs are kept in {work}" in result.stdout and (work / "resumed" / "metrics.jsonl").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)

def test_a_config_error_is_one_line_and_exit_2(tmp_path):
    result = verify(tmp_path, project_config(TINY, optimiser={"_target_": "torch.optim.SGD", "lr": 0.1}))
    assert result.returncode == 2, result.output
    assert result.output == "error: cfg.yaml:12:12: optimiser: unknown key 'optimiser'; did you mean 'optimizer'?\n"
