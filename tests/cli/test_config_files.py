"""Several config files on one command line (``trainer run base.yaml extra.yaml KEY=VALUE``): each
merged over those before it, the overrides last; errors at the line of the file that set the value;
the run's ``config.yaml`` the merged result, which a resume compares. The command line in this
process (``in_process``), real files."""

import json

import yaml

from helpers import in_process

BASE_EXTRAS = """\
scheduler: {_target_: torch.optim.lr_scheduler.StepLR, step_size: 2}
callbacks: [{_target_: trainer.EarlyStopping, patience: 5}]
"""

EXTRA = """\
max_steps: 6
model: {hidden: 12}
optimizer: {lr: 0.05}
scheduler: null
callbacks: []
"""


def files(project, extra=EXTRA):
    """The project's config with a scheduler and a callback (``cfg.yaml``), and ``extra.yaml``."""
    project.write(project.text + BASE_EXTRAS)
    return project.config, project.write(extra, "extra.yaml")


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_later_files_merge_over_earlier_ones_into_the_runs_config(project):
    base, extra = files(project)
    proc = in_process("run", base, extra, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    run_dir = project.runs / "t"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["max_steps"] == 6 and records(run_dir)[-1]["step"] == 6  # the second file's value wins
    # mappings merge key by key; a list, and null, replace the earlier value whole
    assert saved["model"] == {"_target_": "trainer.examples.models.MLP", "in_features": 16, "out_features": 4,
                              "hidden": 12}
    assert saved["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 0.05}
    assert saved["scheduler"] is None and saved["callbacks"] == []
    assert saved["batch_size"] == 16 and saved["loss"] == "torch.nn.functional.cross_entropy"  # the first file's


def test_check_takes_the_files_and_an_override_after_them_wins(project):
    base, extra = files(project)
    proc = in_process("check", base, extra, "optimizer.lr=0.3", "model.hidden=20", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)  # the resolved config; the '# ...' lines after it are comments
    assert printed["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 0.3}
    assert printed["model"]["hidden"] == 20 and printed["max_steps"] == 6 and printed["scheduler"] is None


def test_an_error_in_a_later_file_names_that_file_and_line_and_writes_nothing(project):
    base, extra = files(project, EXTRA + "max_epoch: 3\n")
    line = error_line(in_process("run", base, extra, cwd=project.root))
    assert line == f"error: {extra}:6:12: max_epoch: unknown key 'max_epoch'; did you mean 'max_epochs'?"
    # an argument of a component merged key by key: at the line of the file that set it
    base, extra = files(project, "model: {hiden: 12}\n")
    line = error_line(in_process("run", base, extra, cwd=project.root))
    assert line.startswith(f"error: {extra}:1:16: model.hiden: trainer.examples.models.MLP takes no argument "
                           "'hiden'; did you mean 'hidden'?")
    assert not (project.runs / "t" / "config.yaml").exists()


def test_which_argument_is_a_file_and_which_an_override(project):
    base, extra = files(project)
    line = error_line(in_process("check", base, "max_steps=3", extra, cwd=project.root))
    assert line == (f"error: command line '{extra}': a config file after the override 'max_steps=3'; give the config "
                    "files first, then the KEY=VALUE overrides, which apply last")
    line = error_line(in_process("check", base, "no_such.yaml", cwd=project.root))
    assert line == ("error: no_such.yaml: config file not found (an argument without '=' is a config file; an "
                    "override is KEY=VALUE, e.g. max_steps=200)")
    # A name with '=' is a file first, as it always was, and an override after it
    odd = project.write(project.text, "lr=0.5.yaml")
    proc = in_process("check", odd.name, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    line = error_line(in_process("check", base, odd.name, cwd=project.root))
    assert line == ("error: command line 'lr=0.5.yaml': an argument with '=' after the first config file is an "
                    "override KEY=VALUE, yet this one is a file; to read it as a config, rename it without '='")


def test_a_resume_with_the_same_files_continues_and_a_changed_file_is_listed(project):
    base, extra = files(project)
    assert in_process("run", base, extra, "max_steps=2", cwd=project.root).returncode == 0
    run_dir = project.runs / "t"

    resumed = in_process("run", base, extra, "max_steps=4", "--resume", "auto", cwd=project.root)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: changed since the checkpoint: max_steps: 2 -> 4\n" in resumed.stdout
    assert [r["step"] for r in records(run_dir) if "train/loss" in r] == [2, 4]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}

    project.write(EXTRA.replace("lr: 0.05", "lr: 0.02"), "extra.yaml")
    refused = error_line(in_process("run", base, extra, "max_steps=6", "--resume", "auto", cwd=project.root))
    assert "optimizer.lr: 0.05 -> 0.02 (breaks exact resume)" in refused and "--accept-changes" in refused
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before

    project.write(EXTRA, "extra.yaml")
    evaluated = in_process("eval", base, extra, "--checkpoint", run_dir, cwd=project.root)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["step"] == 4
