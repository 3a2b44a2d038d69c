"""init_from through ``trainer run`` and ``trainer check``: loaded before the sanity pass and recorded in
config.yaml; a missing file is a config error at its line (exit 2); ``--resume auto`` continues from the
checkpoint and does not read init_from's file again."""

import os

import safetensors.torch
import torch
import yaml

from helpers import in_process
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.examples.models import MLP


def weights_file(project, name="start.safetensors"):
    torch.manual_seed(11)
    state = MLP(in_features=16, out_features=4, hidden=8).state_dict()  # the model of the project's config
    safetensors.torch.save_file(state, project.root / name)
    return state


def test_a_run_starts_from_init_from_and_records_it(project):
    state = weights_file(project)
    project.write(project.text + "init_from: start.safetensors\n")
    proc = in_process("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert "init_from: loaded 6 tensors from start.safetensors (safetensors)" in proc.stdout
    run_dir = project.runs / "t"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["init_from"] == {
        "path": "start.safetensors", "strict": True, "rename": {}, "rename_regex": {}}
    final = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert final["config"]["init_from"]["path"] == "start.safetensors"
    assert sorted(final["model"]) == sorted(state)

    check = in_process("check", project.config, cwd=project.root)
    assert check.returncode == 0, check.stderr
    assert "# init_from: loaded 6 tensors from start.safetensors (safetensors)" in check.stdout


def test_a_missing_file_is_a_config_error_at_init_from(project):
    project.write(project.text + "init_from: {path: nowhere/start.pt, strict: false}\n")
    line_number = project.text.count("\n") + 1
    for command in ("run", "check"):
        proc = in_process(command, project.config, cwd=project.root)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert lines[-1].startswith(f"error: {project.config}:{line_number}:")
        assert lines[-1].endswith("init_from: nowhere/start.pt does not exist"), lines[-1]
        assert "Traceback" not in proc.stderr
    # Refused before anything in the run directory changed.
    assert not (project.runs / "t" / "config.yaml").exists() and not (project.runs / "t" / "checkpoints").exists()


def test_a_fifo_is_refused_before_it_is_opened(project, run_cli):
    """Opening a FIFO waits for a writer: ``trainer check`` would hang. One line at init_from, exit 2."""
    os.mkfifo(project.root / "weights.pt")
    project.write(project.text + "init_from: weights.pt\n")
    proc = run_cli("check", project.config, cwd=project.root, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line_number = project.text.count("\n") + 1
    assert proc.stderr.startswith(f"error: {project.config}:{line_number}:")
    assert "init_from: weights.pt is a FIFO (named pipe), not a weights file; name a checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_auto_continues_from_the_checkpoint_without_reading_init_from(project):
    weights_file(project)
    project.write(project.text + "init_from: start.safetensors\ncheckpoint: {every_n_steps: 2, keep_last: null}\n")
    whole = in_process("run", project.config, "name=whole", cwd=project.root)
    assert whole.returncode == 0, whole.stderr
    first = in_process("run", project.config, "name=split", "max_steps=2", cwd=project.root)
    assert first.returncode == 0, first.stderr
    (project.root / "start.safetensors").unlink()  # a resume must not need it
    second = in_process("run", project.config, "name=split", "max_steps=4", "--resume", "auto", cwd=project.root)
    assert second.returncode == 0, second.stderr
    assert "init_from" not in second.stdout  # nothing loaded: the checkpoint's weights go on training
    a = load_checkpoint(list_checkpoints(project.runs / "whole" / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(project.runs / "split" / "checkpoints")[-1])
    assert a["trainer_state"]["global_step"] == b["trainer_state"]["global_step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_init_from_keys_are_checked_at_their_line(project):
    from trainer.cli.run_config import validate
    from trainer.yaml_source import ConfigError, Source

    for text, expected in [
        ("init_from:\n  path: w.pt\n  strickt: true\n", "init_from.strickt: unknown key 'strickt'; did you mean 'strict'?"),
        ("init_from:\n  path: w.pt\n  rename_regex: {'(': ''}\n", "init_from.rename_regex: '(' is not a regular expression"),
        ("init_from: {strict: false}\n", "init_from.path"),
    ]:
        project.write(project.text + text)
        try:
            validate(Source.load(project.config))
        except ConfigError as exc:
            assert expected in str(exc) and str(exc).startswith(f"{project.config}:"), str(exc)
        else:
            raise AssertionError(f"accepted: {text}")
