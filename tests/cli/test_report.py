"""``trainer runs`` reads run directories written by hand: the monitored metric and its mode come
from one callback entry, and a damaged run is a row, never a traceback."""

import json

import pytest

from trainer import run_dir as run_files
from trainer.cli.report import format_table, monitored, runs_table


def write_run(out_dir, name, callbacks="", status='{"status": "finished", "pid": 1}', values=(0.5, 0.2, 0.9)):
    run = out_dir / name
    (run / run_files.CHECKPOINTS).mkdir(parents=True)
    (run / run_files.CHECKPOINTS / run_files.checkpoint_name(30)).write_bytes(b"")
    (run / run_files.CONFIG).write_text(f"name: {name}\nmax_steps: 30\n{callbacks}")
    (run / run_files.STATUS).write_text(status)
    records = [{"step": 10 * (i + 1), "val/loss": v, "val/acc": 1 - v} for i, v in enumerate(values)]
    (run / run_files.METRICS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


TWO_CALLBACKS = """\
callbacks:
  - _target_: trainer.EarlyStopping
    monitor: val/loss
    patience: 3
  - _target_: trainer.BestCheckpoints
    monitor: val/acc
    mode: max
"""


def test_monitor_and_mode_come_from_the_same_callback(tmp_path):
    write_run(tmp_path, "a", TWO_CALLBACKS)
    [row] = runs_table(tmp_path)
    assert (row["metric"], row["best"]) == ("val/loss", 0.2)  # val/loss minimised, as EarlyStopping does


def test_mode_defaults_to_min_and_monitor_to_val_loss(tmp_path):
    run = write_run(tmp_path, "a", "callbacks:\n  - {_target_: my_pkg.callbacks.BestCheckpoints}\n")
    assert monitored([], run) == ("val/loss", "min")
    run = write_run(tmp_path, "b", "callbacks:\n  - {_target_: trainer.EMAWeights}\n"
                                   "  - {_target_: trainer.EarlyStopping, monitor: val/acc, mode: max}\n")
    assert monitored([], run) == ("val/acc", "max")


def test_a_monitor_spelt_elsewhere_in_the_config_is_not_taken(tmp_path):
    run = write_run(tmp_path, "a", "model: {_target_: m.Net, monitor: train/loss, mode: max}\n")
    assert monitored([{"val/acc": 0.5}], run) == ("val/acc", "max")


@pytest.mark.parametrize("damage", [
    lambda run: (run / run_files.STATUS).write_text('{"status": '),
    lambda run: (run / run_files.STATUS).write_text('["finished"]'),
    lambda run: (run / run_files.CONFIG).write_text("callbacks: [\n"),
    lambda run: (run / run_files.CONFIG).write_text("callbacks: [3, {_target_: 4}]\n- x\n"),
    lambda run: (run / run_files.METRICS_JSONL).write_bytes(b'{"step": 1, "val/loss": \xff}\n'),
    lambda run: (run / run_files.METRICS_JSONL).write_text('{"val/loss": 1.0}\n'),
])
def test_a_damaged_run_is_a_row_marked_unreadable(tmp_path, damage):
    write_run(tmp_path, "a")
    damage(write_run(tmp_path, "b"))
    write_run(tmp_path, "c")
    rows = runs_table(tmp_path)
    assert [(r["name"], r["status"]) for r in rows] == [("a", "finished"), ("b", "unreadable"), ("c", "finished")]
    table = format_table(rows)
    assert table.splitlines()[2].split()[:2] == ["b", "unreadable"]
    assert table.splitlines()[-1].startswith("b: ")  # the reason, after the table
