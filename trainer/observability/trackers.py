"""Experiment trackers (MLflow, Weights & Biases) as loggers: the same records as ``metrics.jsonl``,
sent from a background thread so that the loop never waits on the network.

A tracker logger opens its run in ``start`` (``fit`` calls it before the first record, with the
resolved config, which becomes the run's parameters) and keeps the run's id in checkpoints
(``state_dict``), so that a resumed run continues the same tracker run instead of starting another.

A point is never sent twice: each metric goes to the tracker only for steps after the last one it
holds, read back from the tracker when the run is reopened. After a kill the resumed run replays
the steps between the checkpoint and the kill; the tracker already holds those it received, and
gets the others, so its history ends up as an uninterrupted run's. Records logged before the
checkpoint that never reached the tracker come from ``metrics.jsonl``.

The packages are imported when a run starts, on rank 0 only (the Trainer gives loggers to rank 0
alone); a missing one is reported when the logger is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import sqlite3
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from trainer.run_dir import METRICS_JSONL

# A record and the time it was logged at (seconds since the epoch).
Entry = tuple[float, dict[str, float]]

# Not sent as metrics: ``step`` is every point's step; ``epoch`` is in every record of a step.
_NOT_METRICS = ("step", "epoch")


def require(package: str, extra: str, logger: str) -> None:
    """A clear error when an optional tracker package is missing (no import: mlflow's takes seconds)."""
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"the {logger} logger needs the {package} package: pip install 'trainer[{extra}]' "
                          f"(or pip install {package}), or remove '{logger}' from loggers")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"optimizer.lr": 0.001, "callbacks.0._target_": ...}``."""
    if isinstance(config, dict) and config:
        items = config.items()
    elif isinstance(config, (list, tuple)) and config:
        items = enumerate(config)
    else:
        return {prefix: config} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


_PARAM_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


class TrackerError(RuntimeError):
    """A tracker that cannot open its run (a store that cannot be written or reached): a problem of
    the setup, which ``trainer run`` reports in one line (exit 2)."""


def _brief(error: BaseException) -> str:
    """An error in one line: the first line of its innermost cause (the database's own words, not
    the SQL and parameters that SQLAlchemy and MLflow wrap around them over several lines)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class _Sender:
    """A thread that sends batches of records; ``put`` only appends to a queue.

    A send that fails (a metric name the tracker rejects, a server gone) stops the sending, and the
    next call from the loop warns once: the run goes on to its checkpoints, and its own files
    (``metrics.jsonl``, ``metrics.csv``) keep every record."""

    def __init__(self, send: Callable[[list[Entry]], None], name: str):
        self._send, self._name = send, name
        self._queue: queue.Queue[Entry | None] = queue.Queue()
        self._error: BaseException | None = None
        self._told = False
        self._thread = threading.Thread(target=self._run, name=f"trainer-{name}", daemon=True)
        self._thread.start()

    def put(self, entry: Entry) -> None:
        self.check()
        if self._error is None:
            self._queue.put(entry)

    def flush(self) -> None:
        """Wait until every record put so far has been handed to the tracker."""
        self._queue.join()
        self.check()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.check()

    def check(self) -> None:
        if self._error is not None and not self._told:
            self._told = True
            error = self._error
            warnings.warn(f"the {self._name} logger failed to send metrics ({_brief(error)}); it sends "
                          "nothing more in this run, whose own metrics.jsonl and metrics.csv keep every record",
                          stacklevel=4)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():  # everything that piled up goes in one call
                batch.append(self._queue.get())
            entries = [e for e in batch if e is not None]
            try:
                if entries and self._error is None:
                    self._send(entries)
            except Exception as exc:  # the loop's next call warns (check)
                self._error = exc
            for _ in batch:
                self._queue.task_done()
            if batch[-1] is None:
                return


class _Tracker:
    """What both trackers share: the sender, the run's id in checkpoints, and the last step the
    tracker holds of each metric (a point at that step or before is not sent again)."""

    name = ""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self._sender: _Sender | None = None
        self._held: dict[str, float] = {}  # metric -> the last step the tracker holds
        self._held_all = -float("inf")  # every metric up to this step (a tracker that knows only its last step)

    # -- the logger protocol, and what fit and the checkpoints call

    def start(self, config: dict[str, Any]) -> None:
        """Open the run (a new one, or the checkpoint's) and log ``config`` as its parameters; a
        second call (a later ``fit``) only adds parameters. On the caller's thread: a tracker that
        cannot be reached fails here, before the first step.

        A reopened run first gets the records of ``metrics.jsonl`` it lacks: those logged before
        the checkpoint that never reached the tracker (a kill can drop the records a tracker was
        handed but had not stored yet, W&B's writer being a process of its own)."""
        if self._sender is None:
            resuming = self.run_id is not None
            try:
                self._open()
            except TrackerError:
                raise
            except Exception as exc:
                raise TrackerError(f"the {self.name} logger could not open its run ({_brief(exc)}); "
                                   f"{self._setup_hint()}") from exc
            self._sender = _Sender(self._send, self.name)
            if resuming:
                for record in _read_jsonl(self.run_dir / METRICS_JSONL):
                    self._sender.put((time.time(), record))
        self._log_config(config)

    def log(self, record: dict[str, float]) -> None:
        if self._sender is None:
            self.start({})
        self._sender.put((time.time(), dict(record)))

    def state_dict(self) -> dict[str, Any]:
        """The run's id (the run opens here if no record came first)."""
        if self._sender is None:
            self.start({})
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._sender is not None:
            raise RuntimeError(f"the {self.name} logger's run is open already; load the checkpoint before fit starts")
        self.run_id = state["run_id"]

    def flush(self) -> None:
        """Wait until every record logged so far has been handed to the tracker."""
        if self._sender is not None:
            self._sender.flush()

    def close(self) -> None:
        """Send what is left and end the run (a resumed run reopens it). A tracker that cannot end
        its run warns: the training is over and the run directory holds every record and checkpoint,
        so the run does not fail for it."""
        if self._sender is None:
            return
        sender, self._sender = self._sender, None
        try:
            sender.close()
        finally:
            try:
                self._finish()
            except Exception as exc:
                warnings.warn(f"the {self.name} logger could not end its run {self.run_id} ({_brief(exc)}); the "
                              "tracker may still show it as running, and the run's own metrics.jsonl and metrics.csv "
                              "keep every record", stacklevel=2)

    # -- what each tracker provides

    def _setup_hint(self) -> str:
        raise NotImplementedError

    def _open(self) -> None:
        raise NotImplementedError

    def _log_config(self, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def _send_points(self, points: list[tuple[int, dict[str, float], float]]) -> None:
        """``(step, metrics, time)`` of each record, in order (on the sender's thread)."""
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _send(self, entries: list[Entry]) -> None:
        points = []
        for when, record in entries:
            step = int(record["step"])
            metrics = {k: float(v) for k, v in record.items()
                       if k not in _NOT_METRICS and step > max(self._held.get(k, -1), self._held_all)}
            if metrics:
                points.append((step, metrics, when))
                self._held.update(dict.fromkeys(metrics, step))
        if points:
            self._send_points(points)


class MLflowLogger(_Tracker):
    """Logs to an MLflow run: the config as parameters (dotted keys), every number of a record as a
    metric at the record's ``step``.

    ``tracking_uri``: default ``MLFLOW_TRACKING_URI``, else a SQLite database in the run directory
    (``sqlite:///<run_dir>/mlflow.db``; MLflow 3 refuses its ``./mlruns`` file store). ``experiment``:
    default ``MLFLOW_EXPERIMENT_NAME``, else ``Default``. ``run_name``: default the run directory's name.
    """

    name = "mlflow"

    def __init__(self, run_dir: str | Path, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None):
        super().__init__(run_dir)
        require("mlflow", "mlflow", "mlflow")
        self.tracking_uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or f"sqlite:///{self.run_dir.resolve() / 'mlflow.db'}")
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        self.run_name = run_name or self.run_dir.name
        self._client: Any = None

    def _setup_hint(self) -> str:
        return (f"check its tracking_uri, {self.tracking_uri} (loggers: [{{mlflow: {{tracking_uri: ...}}}}], or "
                "MLFLOW_TRACKING_URI)")

    def _open(self) -> None:
        from mlflow import MlflowClient

        if self.tracking_uri.startswith("sqlite:"):
            self._check_sqlite()
        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is not None:
            try:
                run = client.get_run(self.run_id)
            except Exception as exc:  # the checkpoint's run: an unknown id is an error, not a new run
                raise TrackerError(f"the checkpoint's mlflow run {self.run_id} is not in {self.tracking_uri} "
                                   f"({_brief(exc)}); set tracking_uri to the store the run was logged to") from exc
            for key in run.data.metrics:
                history = client.get_metric_history(self.run_id, key)
                self._held[key] = max(m.step for m in history)
            client.update_run(self.run_id, status="RUNNING")
            return
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment)
            except Exception:  # another run created it meanwhile
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id

    def _check_sqlite(self) -> None:
        """Write to the SQLite store once, uncommitted, before MLflow opens it. MLflow retries a store
        it cannot open for about 100 s before it gives up, and one that opens read-only (its disk,
        its folder) fails only at the first write."""
        from sqlalchemy.engine import make_url

        database = make_url(self.tracking_uri).database
        if not database or database == ":memory:":
            return
        path = Path(database)
        try:
            if not path.parent.exists():  # SQLite makes the file, not its folder
                path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o666))
            connection = sqlite3.connect(path, timeout=10)
            try:
                # A table made and rolled back: SQLite writes its journal beside the file, and the
                # database stays as it was.
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("CREATE TABLE trainer_write_check (x)")
            finally:
                connection.rollback()
                connection.close()
        except (OSError, sqlite3.Error) as exc:
            raise TrackerError(f"the mlflow logger cannot write its store {path} ({_brief(exc)}); set tracking_uri "
                               f"(now {self.tracking_uri}) to a SQLite file on a disk you can write "
                               "(loggers: [{mlflow: {tracking_uri: ...}}], or MLFLOW_TRACKING_URI)") from None

    def _log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self._client.get_run(self.run_id).data.params
        params, changed = [], []
        for key, value in flatten(config).items():
            key = _PARAM_KEY.sub("_", key)  # MLflow's key alphabet; a YAML key may hold any character
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:  # MLflow refuses longer values; the start is kept
                text = text[:MAX_PARAM_VAL_LENGTH - 3] + "..."
            if key not in logged:
                params.append(Param(key, text))
            elif logged[key] != text:
                changed.append(key)
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        if changed:
            warnings.warn(f"mlflow run {self.run_id} keeps its first value of the parameter(s) {', '.join(changed)}: "
                          "MLflow parameters cannot change (the new values are in the run directory's config.yaml)",
                          stacklevel=4)  # at the caller of fit

    def _send_points(self, points: list[tuple[int, dict[str, float], float]]) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        batch = [Metric(k, float(v), int(when * 1000), step) for step, metrics, when in points for k, v in metrics.items()]
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])

    def _finish(self) -> None:
        self._client.set_terminated(self.run_id)


class WandbLogger(_Tracker):
    """Logs to a Weights & Biases run: the config as the run's config, every number of a record at
    the record's ``step``.

    ``project``: default ``WANDB_PROJECT``, else ``trainer``. ``mode``: ``online``, ``offline`` or
    ``disabled`` (default ``WANDB_MODE``, else online). ``dir``: where W&B writes its files (default
    ``WANDB_DIR``, else the run directory). A resumed offline run writes a new ``offline-run-*``
    folder with the same run id, holding only the steps the earlier ones lack; ``wandb sync`` uploads
    them into one run.
    """

    name = "wandb"

    def __init__(self, run_dir: str | Path, project: str | None = None, entity: str | None = None,
                 run_name: str | None = None, mode: str | None = None, dir: str | Path | None = None):
        super().__init__(run_dir)
        require("wandb", "wandb", "wandb")
        self.project = project or os.environ.get("WANDB_PROJECT") or "trainer"
        self.entity, self.mode = entity, mode
        self.run_name = run_name or self.run_dir.name
        self.dir = Path(dir or os.environ.get("WANDB_DIR") or self.run_dir)
        self._run: Any = None

    def _setup_hint(self) -> str:
        return (f"check its project ({self.project}), entity, mode and dir ({self.dir}) (loggers: [{{wandb: "
                "{...}}]), or the WANDB_* variables")

    def _open(self) -> None:
        import wandb

        resuming = self.run_id is not None
        if resuming:
            self._held = _wandb_offline_steps(self.dir / "wandb", self.run_id)
            _after_last_start(self.dir / "wandb", self.run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=self.project, entity=self.entity, name=self.run_name, id=self.run_id,
                               resume="allow" if resuming else None, mode=self.mode, dir=str(self.dir),
                               settings=wandb.Settings(console="off", silent=True))
        self.run_id = self._run.id
        if resuming and not self._run.offline:
            # Online, the server knows the run's last step (W&B drops earlier ones anyway).
            self._held_all = self._run.starting_step - 1

    def _log_config(self, config: dict[str, Any]) -> None:
        if config:
            self._run.config.update(config, allow_val_change=True)

    def _send_points(self, points: list[tuple[int, dict[str, float], float]]) -> None:
        for step, metrics, _ in points:
            self._run.log(metrics, step=step)

    def _finish(self) -> None:
        self._run.finish()


def _read_jsonl(path: Path) -> list[dict[str, float]]:
    """The whole records of a metrics file (NaN/Inf, written as strings, as floats again)."""
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut off by a crash
                continue
            records.append({k: float(v) for k, v in record.items()})
    return records


def _after_last_start(wandb_dir: Path, run_id: str) -> None:
    """Returns once the local clock's second is not that of an earlier folder of ``run_id``. W&B names
    a run's folder ``[offline-]run-<start second>-<id>`` and truncates the log file in it, so a resume
    started within the same second as the run before would erase that run's history."""
    taken = {p.name[: -len(run_id) - 1].rsplit("-", 1)[-1] for p in wandb_dir.glob(f"*run-*-{run_id}")}
    while time.strftime("%Y%m%d_%H%M%S", time.localtime()) in taken:
        time.sleep(1.0 - time.time() % 1.0 + 0.001)


def _wandb_offline_steps(wandb_dir: Path, run_id: str) -> dict[str, float]:
    """The last step of each metric in the offline runs of ``run_id`` written so far."""
    held: dict[str, float] = {}
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for step, key, _ in wandb_history(path):
            held[key] = max(held.get(key, -1), step)
    return held


def wandb_history(path: str | Path) -> list[tuple[int, str, Any]]:
    """The ``(step, key, value)`` points of a ``.wandb`` file's history rows (W&B's own keys, which
    start with ``_``, left out). The file is a LevelDB log of protobuf records after a 7-byte W&B
    header; a file cut off by a kill yields its complete records."""
    from wandb.proto import wandb_internal_pb2

    points = []
    for data in _leveldb_records(Path(path).read_bytes(), start=7):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                points.append((record.history.step.num, key, json.loads(item.value_json)))
    return points


def _leveldb_records(data: bytes, start: int) -> list[bytes]:
    """The records of a LevelDB log: 32 KiB blocks of chunks, each a 7-byte header (checksum,
    length, type: 1 full, 2 first, 3 middle, 4 last) and its payload."""
    block, records, parts, at = 32768, [], [], start
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        length, kind = struct.unpack_from("<HB", data, at + 4)
        payload = data[at + 7:at + 7 + length]
        if len(payload) < length or kind == 0:
            break  # cut off, or the zeroed end of a file being written
        at += 7 + length
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            parts = [payload]
        elif kind == 3:
            parts.append(payload)
        elif kind == 4:
            records.append(b"".join(parts + [payload]))
            parts = []
    return records


