"""``trainer runs`` reads run directories written by hand: the monitored metric and its mode come
from one callback entry, and a damaged run is a row, never a traceback."""

import itertools
import json
import random

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
    assert [ax.get_title() for ax in axes] == ["loss", "monitored metric", "learning rate", "share of wall time: a",
                                               "val/teacher_acc"]
    assert all(axes[0].get_shared_x_axes().joined(axes[0], ax) for ax in axes[1:])
    assert [line.get_label() for line in axes[4].lines] == ["a val/teacher_acc", "b val/teacher_acc"]
    assert axes[3].get_title() == "share of wall time: a"  # b logged no shares


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


def write_long_run(out_dir, name, steps=1300):
    """A run logged every step: a noisy falling train loss and gradient norm, shares of wall time
    (and the GPU's, as on CUDA) that change from step to step, and a validation every 100 steps."""
    rng = random.Random(0)
    records = []
    for step in range(1, steps + 1):
        data, compute = rng.uniform(0, 0.3), rng.uniform(0.2, 0.5)
        optimizer = rng.uniform(0, 1 - data - compute)
        records.append({"step": step, "epoch": 0, "train/loss": (1 + 5 / step) * rng.uniform(0.2, 1.8), "lr": 0.01,
                        "grad_norm/total": rng.uniform(0.5, 2), "time/data": data, "time/compute": compute,
                        "time/optimizer": optimizer, "time/other": 1 - data - compute - optimizer,
                        "time/gpu_busy": compute})
        if step % 100 == 0:
            records.append({"step": step, "epoch": 0, "val/loss": 1 + 5 / step, "val/acc": 0.5})
    run = out_dir / name
    run.mkdir(parents=True)
    (run / run_files.METRICS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def panel(fig, title):
    [ax] = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    return ax


def test_plot_smooths_a_noisy_series_over_its_faint_raw_values(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.cli.report import figure

    loss = panel(figure([write_long_run(tmp_path, "long")]), "loss")
    train, val = [line for line in loss.lines if not line.get_label().startswith("_")]
    [raw] = [line for line in loss.lines if line.get_label().startswith("_")]
    assert train.get_label() == "train/loss (EMA 0.95)"
    assert list(raw.get_xdata()) == list(train.get_xdata()) == list(range(1, 1301))
    assert raw.get_alpha() < 1 and raw.get_color() == train.get_color()
    # The average is smoother than the raw values: smaller steps from point to point.
    assert total_variation(train.get_ydata()) < total_variation(raw.get_ydata()) / 5
    assert val.get_label() == "val/loss" and val.get_marker() == "o" and len(val.get_xdata()) == 13
    assert train.get_color() != val.get_color()

    # 40 points: drawn as they are.
    loss = panel(figure([write_logged_run(tmp_path, "short")]), "loss")
    assert [(line.get_label(), line.get_marker(), line.get_alpha()) for line in loss.lines] == [
        ("train/loss", "None", None), ("val/loss", "o", None)]


def total_variation(values):
    return sum(abs(b - a) for a, b in itertools.pairwise(values))


def test_ema_is_debiased_as_tensorboard_smooths():
    from trainer.cli.report import ema, smoothing_weight

    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0 at the start
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
    assert [smoothing_weight(n) for n in (5, 60, 160, 1300)] == [0.0, 0.0, 0.62, 0.95]


def test_plot_overlaid_runs_differ_by_style_and_keep_their_colours_in_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.cli.report import figure

    fig = figure([write_long_run(tmp_path, "a"), write_logged_run(tmp_path, "b"), write_logged_run(tmp_path, "c")])
    drawn = [line for line in panel(fig, "loss").lines if not line.get_label().startswith("_")]
    assert [line.get_label() for line in drawn] == ["a train/loss (EMA 0.95)", "a val/loss", "b train/loss",
                                                    "b val/loss", "c train/loss", "c val/loss"]
    assert len({line.get_color() for line in drawn}) == 6
    assert [line.get_linestyle() for line in drawn] == ["-", "-", "--", "--", ":", ":"]
    lr = panel(fig, "learning rate").lines
    assert [line.get_color() for line in lr] == [line.get_color() for line in drawn[::2]]  # each run's first colour


def test_plot_stacks_the_shares_of_wall_time_a_panel_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection

    from trainer.cli.report import figure

    fig = figure([write_long_run(tmp_path, "a"), write_logged_run(tmp_path, "b", timed=True)])
    long_run, short_run = [ax for ax in fig.axes if ax.get_title().startswith("share of wall time")]
    assert long_run.get_title() == "share of wall time: a (means of 33 log intervals)"
    assert short_run.get_title() == "share of wall time: b"  # 40 intervals, each its own point
    for ax in long_run, short_run:
        layers = ax.collections
        assert all(isinstance(layer, PolyCollection) for layer in layers)
        assert [layer.get_label() for layer in layers] == ["time/data", "time/compute", "time/optimizer", "time/other"]
        tops = [max(vertices[:, 1]) for vertices in (layer.get_paths()[0].vertices for layer in layers)]
        # A stack, each layer on the one below, up to the whole step and no higher.
        assert tops == sorted(tops) and tops[-1] == pytest.approx(1) and tops[-1] <= 1 + 1e-9
        assert ax.get_ylim() == (0, 1)
    [busy] = long_run.lines  # a line over the stack: it overlaps the shares
    assert busy.get_label() == "time/gpu_busy" and 0.2 < min(busy.get_ydata()) < max(busy.get_ydata()) < 0.5
    assert not short_run.lines
