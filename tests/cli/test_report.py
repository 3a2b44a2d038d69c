"""``trainer runs`` reads run directories written by hand: the monitored metric and its mode come
from one callback entry, and a damaged run is a row, never a traceback."""

import json

import pytest

from helpers import in_process
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


def test_runs_shows_the_data_wait_of_the_latest_interval(tmp_path):
    run = write_run(tmp_path, "a")
    with (run / run_files.METRICS_JSONL).open("a") as f:
        for step, wait in ((2, 0.5), (4, 0.625)):
            f.write(json.dumps({"step": step, "epoch": 0, "train/loss": 1.0, "time/data": wait}) + "\n")
    write_run(tmp_path, "b")  # logged no time shares
    table = format_table(runs_table(tmp_path)).splitlines()
    assert "data wait" in table[0]
    column = table[0].index("data wait")
    assert [line[column:].split()[0] for line in table[1:]] == ["62%", "-"]


def write_logged_run(out_dir, name, shift=0.0, timed=False):
    """A run as the Trainer logs one: train records with lr (and with ``timed``, the shares of wall
    time), evaluations with a metric of the user's."""
    run = out_dir / name
    run.mkdir(parents=True)
    records = []
    for step in range(1, 41):
        records.append({"step": step, "epoch": step // 10, "train/loss": 2.0 / step + shift, "lr": 0.01 * (1 - step / 41)})
        if timed:
            records[-1].update({"time/data": 0.5, "time/compute": 0.3, "time/optimizer": 0.1, "time/other": 0.1})
        if step % 10 == 0:
            records.append({"step": step, "epoch": step // 10 - 1, "val/loss": 1.0 / step + shift,
                            "val/acc": 0.5 + step / 100, "val/teacher_acc": 0.55 + step / 100 - shift})
    (run / run_files.METRICS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_plot_draws_a_panel_per_metric_on_one_step_axis_and_no_empty_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.cli.report import figure

    runs = [write_logged_run(tmp_path, "a", timed=True), write_logged_run(tmp_path, "b", shift=0.05)]
    fig = figure(runs, ["val/teacher_acc"])
    axes = fig.axes
    # No gradient norm was logged: no panel for it.
    assert [ax.get_title() for ax in axes] == ["loss", "monitored metric", "learning rate", "share of wall time",
                                               "val/teacher_acc"]
    assert all(axes[0].get_shared_x_axes().joined(axes[0], ax) for ax in axes[1:])
    assert [line.get_label() for line in axes[4].lines] == ["a val/teacher_acc", "b val/teacher_acc"]
    shares = axes[3].lines
    assert [line.get_label() for line in shares][:4] == [f"a time/{n}" for n in ("data", "compute", "optimizer", "other")]
    assert len({line.get_linestyle() for line in shares}) == 4  # one style per share, no gpu_busy logged on CPU


def test_plot_metric_on_the_command_line(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    runs = [write_logged_run(tmp_path, "a"), write_logged_run(tmp_path, "b", shift=0.05)]
    out = tmp_path / "curves.png"
    proc = in_process("plot", *runs, "--metric", "val/teacher_acc", "--metric", "val/loss", "--out", out)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        assert image.size == (990, round((0.6 + 2.4 * 5) * 110))  # five panels, one above the other

    proc = in_process("plot", *runs, "--metric", "val/teacher_ac", "--out", out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --metric val/teacher_ac: no run logged it; did you mean 'val/teacher_acc'? logged: lr, train/loss, "
        "val/acc, val/loss, val/teacher_acc"]
