"""The MLflow and W&B loggers, for real: MLflow in a SQLite database, W&B in offline mode, read back
with MLflow's client and from W&B's own run files."""

import importlib.util
import json
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from helpers import NOISY, classification, in_process, mlp, process_env, project_config
from trainer import Callback, MLflowLogger, Trainer, WandbLogger
from trainer.observability.trackers import flatten, wandb_history
from trainer.observability.timing import is_timing

# Asked without importing them (a second and a half at each worker's collection; the tests import them).
pytestmark = [
    pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ("mlflow", "wandb")),
                       reason="needs mlflow and wandb (the test extra)"),
    pytest.mark.usefixtures("offline_trackers"),
]


def mlflow_history(uri: str, run_id: str) -> list[tuple[int, str, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    points = []
    for key in client.get_run(run_id).data.metrics:
        points += [(m.step, key, m.value) for m in client.get_metric_history(run_id, key)]
    return sorted(points)


def expected_points(records: list[dict]) -> list[tuple[int, str, float]]:
    return sorted((int(r["step"]), k, v) for r in records for k, v in r.items() if k not in ("step", "epoch"))


def without_timing(points):
    return [p for p in points if not is_timing(p[1])]  # the clock: differs between any two runs


def test_config_flattens_to_dotted_keys():
    assert flatten({"optimizer": {"_target_": "torch.optim.AdamW", "lr": 0.01}, "callbacks": [{"a": 1}], "x": [],
                    "y": None}) == {"optimizer._target_": "torch.optim.AdamW", "optimizer.lr": 0.01,
                                    "callbacks.0.a": 1, "x": [], "y": None}


def test_a_missing_package_names_the_extra_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'trainer\[mlflow\]'"):
        MLflowLogger(tmp_path)


def test_from_code_params_metrics_and_a_resume_into_the_same_runs(tmp_path):
    """The config becomes parameters (a value past MLflow's limit is cut, not refused), every record's
    numbers become metrics at its step; a second Trainer resumed from the checkpoint reopens both
    runs and adds only the steps after it."""
    run_dir = tmp_path / "run"
    x, y = classification(16 * 8)

    def fit(steps, resume=None):
        model = mlp()
        loggers = [MLflowLogger(run_dir), WandbLogger(run_dir)]
        config = {"max_steps": steps, "batch_size": 8, "log_every_n_steps": 2, "progress": "off",
                  "eval_every_n_epochs": None, "sanity_check": False, "checkpoint": {"every_n_steps": 4}}
        t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), (x, y), loss_fn=F.cross_entropy,
                    run_dir=run_dir, loggers=loggers, config=config,
                    run_config={**config, "note": "n" * 7000})
        try:
            t.fit(resume_from=resume)
        finally:
            for logger in loggers:
                logger.close()
        return t, loggers

    first, (mlf, wb) = fit(4)
    with pytest.warns(UserWarning, match=r"keeps its first value of the parameter\(s\) max_steps: MLflow parameters"):
        second, (mlf2, wb2) = fit(8, resume=run_dir / "checkpoints" / "step-00000004.pt")
    assert (mlf2.run_id, wb2.run_id) == (mlf.run_id, wb.run_id)

    from mlflow import MlflowClient

    run = MlflowClient(mlf.tracking_uri).get_run(mlf.run_id)
    assert run.data.params["checkpoint.every_n_steps"] == "4" and run.data.params["max_steps"] == "4"
    assert len(run.data.params["note"]) == 6000 and run.data.params["note"].endswith("...")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    records = first.history + second.history
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert mlflow_history(mlf.tracking_uri, mlf.run_id) == expected_points(records)
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{wb.run_id}/run-{wb.run_id}.wandb"))
    assert len(files) == 2  # the resumed offline run: a second folder, the same run id
    assert sorted(p for f in files for p in wandb_history(f)) == expected_points(records)
    assert sorted(wandb_history(files[1])) == sorted(leet_points(files[1]))  # W&B's own reader agrees


@pytest.mark.slow
def test_a_resume_within_the_second_of_the_last_start_waits_for_the_next_second(tmp_path):
    """W&B names a run's folder after its start second and truncates the log in it: a resume started
    within that second would erase the run before it, so it waits for the next second."""
    import time

    from trainer.observability.trackers import _after_last_start

    for _ in range(3):
        now = time.strftime("%Y%m%d_%H%M%S", time.localtime())
        (tmp_path / f"offline-run-{now}-ab-c1").mkdir()  # a W&B id may hold a dash
        (tmp_path / "offline-run-20200101_000000-other").mkdir(exist_ok=True)
        _after_last_start(tmp_path, "ab-c1")
        assert time.strftime("%Y%m%d_%H%M%S", time.localtime()) != now


def leet_points(path):
    """The history points of a ``.wandb`` file as W&B's own reader (``wandb leet inspect --json``) lists them."""
    wandb = Path(sys.executable).with_name("wandb")
    shown = subprocess.run([str(wandb), "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                           timeout=120)
    points = []
    for line in shown.stdout.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            step = record["history"]["step"]["num"]
            points += [(int(step), k, v) for k, v in record["history"]["item"].items() if not k.startswith("_")]
    assert points, shown.stderr
    return points


@pytest.mark.slow
def test_a_send_the_tracker_refuses_warns_once_and_the_run_keeps_its_checkpoints_and_records(tmp_path):
    """MLflow refuses a metric name of 300 characters: the run goes on to its checkpoints, the tracker
    stops sending with one warning, and metrics.jsonl keeps every record."""
    x, y = classification(8 * 8)
    long_name = "a" * 300

    class LogsLong(Callback):
        def on_train_batch_end(self, trainer, outputs, batch):
            if trainer.global_step >= 2:
                trainer.log(long_name, 1.0)

    model = mlp()
    logger = MLflowLogger(tmp_path)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                run_dir=tmp_path, loggers=[logger], callbacks=[LogsLong()],
                config={"max_steps": 8, "batch_size": 8, "log_every_n_steps": 2, "progress": "off",
                        "eval_every_n_epochs": None, "sanity_check": False, "checkpoint": {"every_n_steps": 4}})
    try:
        with pytest.warns(UserWarning, match=r"the mlflow logger failed to send metrics \(.*\); it sends nothing more "
                                             r"in this run, whose own metrics.jsonl and metrics.csv keep every record") as caught:
            t.fit()
            logger.flush()  # the send fails on the tracker's thread: the loop's next call to it warns
    finally:
        logger.close()
    assert len([w for w in caught if "failed to send" in str(w.message)]) == 1
    assert t.global_step == 8 and (tmp_path / "checkpoints" / "step-00000008.pt").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8] and all(long_name in r for r in records[1:])


@pytest.mark.slow
def test_kill_9_and_resume_auto_leave_one_tracker_run_equal_to_the_metric_file(tmp_path):
    """A real ``trainer run`` with both trackers, killed (SIGKILL) after the last validation, past
    the checkpoint of step 15, once every record went to the trackers (MLflow has stored steps 16
    and 18; W&B's writer, a process of its own, may have lost some); ``--resume auto`` replays steps
    16-18. Each tracker ends with one run whose history is the metric file's (which
    tests/cli/test_resume.py holds equal to an uninterrupted run's): no step twice, none missing."""
    out = tmp_path / "runs"
    marker = tmp_path / "fired"
    config = tmp_path / "cfg.yaml"
    loggers = [{"mlflow": {"experiment": "kills"}}, "wandb"]
    config.write_text(project_config(NOISY, out_dir=str(out), loggers=loggers) + (
        f"callbacks:\n  - {{_target_: killers.KillAt, where: after_validation, step: 18, marker: '{marker}', "
        "flush_loggers: true}\n"))
    # (not the W&B service this test process started: a run killed there would hold its run id)
    env = process_env()
    env.pop("WANDB_SERVICE", None)
    first = subprocess.run([sys.executable, "-m", "trainer", "run", config], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    from mlflow import MlflowClient

    uri = f"sqlite:///{out / 'r' / 'mlflow.db'}"
    client = MlflowClient(uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("kills").experiment_id])
    # step 16 is past the checkpoint of step 15: the resumed run replays it, and must not send it again
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")] == [4, 8, 12, 16]
    second = in_process("run", config, "--resume", "auto")  # the resume need not be a process of its own
    assert second.returncode == 0, second.stderr
    run_dir = out / "r"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 6, 8, 12, 12, 16, 18, 18]
    expected = without_timing(expected_points(records))

    runs = client.search_runs([client.get_experiment_by_name("kills").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["optimizer.lr"] == "0.01" and runs[0].data.params["loggers.1"] == "wandb"
    assert without_timing(mlflow_history(uri, runs[0].info.run_id)) == expected

    # W&B offline: one run id, its points split over the killed run's folder and the resumed one's.
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    ids = {f.name.rsplit("-", 1)[1] for f in folders}
    assert len(folders) == 2 and len(ids) == 1, folders
    (run_id,) = ids
    points = [p for f in folders for p in wandb_history(f / f"run-{run_id}.wandb")]
    assert without_timing(sorted(points)) == expected


def store_error(proc) -> str:
    """The one line of a store that cannot be written: exit 2, nothing else on stderr."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_a_tracker_store_that_cannot_be_opened_is_one_line_with_exit_2(tmp_path):
    """A tracking_uri whose folder is a file: one line naming the store and the fix, exit 2, nothing
    trained; a config key outside MLflow's alphabet becomes a parameter all the same, and the check
    that the store can be written leaves nothing in it."""
    from helpers import PROJECT_CONFIG

    (tmp_path / "afile").write_text("not a folder")
    config = tmp_path / "cfg.yaml"
    store = tmp_path / "afile" / "x.db"
    config.write_text(PROJECT_CONFIG + f"out_dir: {tmp_path / 'runs'}\n"
                      f"loggers: [{{mlflow: {{tracking_uri: 'sqlite:///{store}'}}}}]\n")
    assert store_error(in_process("run", config)) == (
        f"error: the mlflow logger cannot write its store {store} (NotADirectoryError: [Errno 20] Not a directory: "
        f"'{store}'); set tracking_uri (now sqlite:///{store}) to a SQLite file on a disk you can write (loggers: "
        "[{mlflow: {tracking_uri: ...}}], or MLFLOW_TRACKING_URI)")
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()

    logger = MLflowLogger(tmp_path / "ok")
    try:
        logger.start({"metrics": {"f1@x": {"_target_": "m.F1"}}})
        from mlflow import MlflowClient

        params = MlflowClient(logger.tracking_uri).get_run(logger.run_id).data.params
        assert params == {"metrics.f1_x._target_": "m.F1"}
        with closing(sqlite3.connect(tmp_path / "ok" / "mlflow.db")) as db:
            assert not db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'trainer%'").fetchall()
    finally:
        logger.close()


def test_a_store_on_a_read_only_disk_is_one_line_with_exit_2_at_once(project, mount_tmpfs):
    """A store on a read-only file system: MLflow retries opening it for about 100 s, then reports it
    over two lines; the logger's own write when the run starts fails at once, in one line naming
    the store, the URI and the fix, exit 2, before the first step."""
    read_only = mount_tmpfs("64k", read_only=True)
    store = read_only / "mlflow.db"
    project.write(project_config(loggers=[{"mlflow": {"tracking_uri": f"sqlite:///{store}"}}]))
    assert store_error(in_process("run", project.config, cwd=project.root)) == (
        f"error: the mlflow logger cannot write its store {store} (OSError: [Errno 30] Read-only file system: "
        f"'{store}'); set tracking_uri (now sqlite:///{store}) to a SQLite file on a disk you can write (loggers: "
        "[{mlflow: {tracking_uri: ...}}], or MLFLOW_TRACKING_URI)")
    assert not (project.runs / "t" / "checkpoints").exists()
    assert not (project.runs / "t" / "metrics.jsonl").read_text()


FILL = """\
class FillAt:
    \"\"\"Fills the file system of ``folder`` once the run reaches ``step``, and again when it ends,
    once the loggers have sent or failed to send every record (a failed write gives back its space).\"\"\"

    def __init__(self, step: int, folder: str):
        self.step, self.folder = step, folder

    def on_train_batch_end(self, trainer, outputs, batch):
        if trainer.global_step == self.step:
            self.fill()

    def on_fit_end(self, trainer):
        for logger in trainer.loggers:
            if hasattr(logger, "flush"):
                logger.flush()
        self.fill()

    def fill(self):
        with open(f"{self.folder}/filler", "ab", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(4096))
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC
"""


def test_a_store_whose_disk_fills_warns_and_the_run_finishes(project, mount_tmpfs):
    """The MLflow store's disk fills at step 3 of 8: the sends stop with a warning, training goes on
    to its last checkpoint, and MLflow's end of the run (set_terminated) fails too, after training:
    a second warning, not an internal error; status.json says finished, exit 0."""
    disk = mount_tmpfs("2m")
    uri = f"sqlite:///{disk / 'mlflow.db'}"
    project.write(FILL, "fills.py")
    project.write(project_config(max_steps=8, checkpoint={"every_n_steps": 4},
                                 loggers=[{"mlflow": {"tracking_uri": uri, "experiment": "full"}}],
                                 callbacks=[{"_target_": "fills.FillAt", "step": 3, "folder": str(disk)}]))
    proc = in_process("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr
    assert proc.stderr.count("the mlflow logger failed to send metrics (OperationalError: database or disk is "
                             "full); it sends nothing more") == 1, proc.stderr
    assert proc.stderr.count("could not end its run") == 1, proc.stderr
    run_dir = project.runs / "t"
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 8)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004.pt", "step-00000008.pt"]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line] == [2, 4, 6, 8]

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert run.info.status == "RUNNING"  # its end could not be written: the warning says so
    assert f"could not end its run {run.info.run_id} (OperationalError: database or disk is full)" in proc.stderr
