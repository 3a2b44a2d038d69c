"""Reading run directories back: the status file, ``trainer runs`` and ``trainer plot``."""

from __future__ import annotations

import difflib
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from trainer.run_dir import CONFIG, METRICS_JSONL, STATUS, checkpoint_dir, list_checkpoints, lock_holder


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_JSONL
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut off by a crash
            continue
    return records


def run_status(run_dir: Path) -> str:
    path = run_dir / STATUS
    if not path.exists():
        return "unknown"
    data = json.loads(path.read_text(encoding="utf-8"))
    status = data["status"]
    if not isinstance(status, str):
        raise ValueError(f"{STATUS} holds status {status!r}")
    if status == "running" and lock_holder(run_dir) is None:
        return "died"  # its process ended without a chance to say so (SIGKILL, the OOM killer, power loss)
    return status


# The callbacks that name a monitored metric, with their constructors' defaults (spelt here so that
# reading a run directory never imports torch).
_MONITORING = ("EarlyStopping", "BestCheckpoints")
_DEFAULT_MONITOR, _DEFAULT_MODE = "val/loss", "min"


def monitored(records: list[dict[str, Any]], run_dir: Path) -> tuple[str | None, str]:
    """The metric to rank by, with its mode, both from the first EarlyStopping or BestCheckpoints
    entry of the run's config; without one, val/acc (max), else val/loss (min)."""
    config = run_dir / CONFIG
    if config.exists():
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{CONFIG} is not a mapping")
        for entry in data.get("callbacks") or []:
            target = entry.get("_target_", "") if isinstance(entry, dict) else ""
            if isinstance(target, str) and target.rsplit(".", 1)[-1] in _MONITORING:
                return str(entry.get("monitor", _DEFAULT_MONITOR)), str(entry.get("mode", _DEFAULT_MODE))
    names = {k for r in records for k in r}
    for name, mode in (("val/acc", "max"), ("val/loss", "min")):
        if name in names:
            return name, mode
    return None, "min"


# What a damaged run directory raises while it is read: a file that is not what it should be
# (cut off, hand-edited, a folder in its place, unreadable bytes).
_DAMAGE = (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError)


class UnreadableRun(Exception):
    """A run directory whose files cannot be read back."""


def runs_table(out_dir: Path) -> list[dict[str, Any]]:
    """One row per run directory; a damaged one gets status ``unreadable`` and its reason."""
    rows = []
    for run_dir in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        if not (run_dir / METRICS_JSONL).exists() and not (run_dir / STATUS).exists():
            continue
        try:
            rows.append(_row(run_dir))
        except _DAMAGE as exc:
            rows.append({"name": run_dir.name, "status": "unreadable", "steps": "-", "metric": "-", "best": None,
                         "data_wait": None, "checkpoint": "-", "problem": " ".join(f"{type(exc).__name__}: {exc}".split())})
    return rows


def _row(run_dir: Path) -> dict[str, Any]:
    records = read_records(run_dir)
    metric, mode = monitored(records, run_dir)
    values = [r[metric] for r in records if metric in r and isinstance(r[metric], (int, float))]
    best = (max if mode == "max" else min)(values) if values else None
    checkpoints = list_checkpoints(checkpoint_dir(run_dir))
    # The share of wall time spent waiting for data in the latest log interval (trainer.observability.timing).
    waits = [r["time/data"] for r in records if isinstance(r.get("time/data"), (int, float))]
    return {
        "name": run_dir.name,
        "status": run_status(run_dir),
        # The step the run reached: a run stopped between log points has logged less (its checkpoint
        # and status.json say where it stopped).
        "steps": max([int(r["step"]) for r in records] + [_status_step(run_dir)]),
        "metric": metric or "-",
        "best": best,
        "data_wait": waits[-1] if waits else None,
        "checkpoint": checkpoints[-1].name if checkpoints else "-",
    }


def _status_step(run_dir: Path) -> int:
    """The step ``status.json`` names (written when a run ends), else 0."""
    try:
        step = json.loads((run_dir / STATUS).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return 0
    return step if isinstance(step, int) else 0


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["name", "status", "steps", "monitored", "best", "data wait", "newest checkpoint"]
    lines = [[r["name"], r["status"], str(r["steps"]), r["metric"],
              "-" if r["best"] is None else f"{r['best']:.4g}",
              "-" if r.get("data_wait") is None else f"{r['data_wait']:.0%}", r["checkpoint"]] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    notes = [f"{r['name']}: {r['problem']}" for r in rows if r.get("problem")]
    return "\n".join([fmt.format(*header).rstrip()] + [fmt.format(*line).rstrip() for line in lines] + notes)


# The shares of a step's wall time that add up to it (trainer.observability.timing), stacked on the
# plot's panel; time/gpu_busy overlaps them, so it is a line over the stack.
_TIME_SHARES = ("time/data", "time/compute", "time/optimizer", "time/other")
_GPU_BUSY = "time/gpu_busy"
# Within a run, colour tells the series apart: train/loss and val/loss, or one panel's series; run i
# draws with colours C(2i) and C(2i+1) in every panel, and a line style of its own.
_SERIES_PER_RUN = 2
_RUN_STYLES = ("-", "--", ":", "-.")


class NoSuchMetric(Exception):
    """A ``--metric`` that none of the plotted runs logged."""


def plot_runs(run_dirs: list[Path], out: Path, metrics: list[str] = ()) -> Path:
    """Write ``figure(run_dirs, metrics)`` to the PNG ``out``."""
    fig = figure(run_dirs, metrics)
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def smoothing_weight(points: int) -> float:
    """The EMA weight for a series of ``points`` values: it averages over about a thirtieth of them
    (``2 / (1 - weight)`` points), so that a series of 60 points or fewer is drawn as it is, one of
    160 gets 0.62 and one logged every step for 1,300 steps 0.95."""
    return min(0.99, round(max(0.0, 1 - 60 / points), 2))


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the first values are
    not pulled towards the 0 it starts from."""
    smoothed, last = [], 0.0
    for i, value in enumerate(values, 1):
        last = weight * last + (1 - weight) * value
        smoothed.append(last / (1 - weight**i))
    return smoothed


def _smoothed(key: str) -> bool:
    """Per-step values are noisy; a validation value (already an average over the validation set)
    and the learning rate (a schedule) are drawn as they are."""
    return key.split("/")[0] not in ("val", "test", "lr")


def figure(run_dirs: list[Path], metrics: list[str] = ()) -> Any:
    """Train/val loss, the monitored metric, LR, total gradient norm, where the step's time goes
    (``time/data``, ``time/compute``, ``time/optimizer``, ``time/other`` stacked, a panel per run,
    and, on CUDA, ``time/gpu_busy`` over them: shares of wall time) and each of ``metrics`` against
    step, one panel each on one shared step axis, runs overlaid. Noisy series are drawn faint with
    their EMA over them. A panel no run has data for is left out; a requested metric that no run
    logged is an error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("trainer plot needs matplotlib: pip install 'trainer[plot]' (or pip install matplotlib)") from None
    runs = []
    for run_dir in run_dirs:
        try:
            records = read_records(run_dir)
            metric, _ = monitored(records, run_dir)
        except _DAMAGE as exc:
            raise UnreadableRun(f"{run_dir}: unreadable run: {type(exc).__name__}: {exc}") from None
        runs.append((run_dir, records, metric))
    logged = sorted({k for _, records, _ in runs for r in records for k in r} - {"step", "epoch"})
    for name in metrics:
        if name not in logged:
            close = difflib.get_close_matches(name, logged, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NoSuchMetric(f"--metric {name}: no run logged it; {hint}logged: {', '.join(logged)}")
    several = len(runs) > 1
    # (title, keys of each run, log scale); the monitored metric is each run's own; None: the time shares.
    panels = [("loss", lambda m: ["train/loss", "val/loss"], True),
              ("monitored metric", lambda m: [m] if m else [], False),
              ("learning rate", lambda m: ["lr"], False),
              ("total gradient norm", lambda m: ["grad_norm/total"], True),
              ("share of wall time", None, False)]
    panels += [(name, lambda m, name=name: [name], False) for name in dict.fromkeys(metrics)]
    drawn = []  # (title, draw(ax)) of each panel with data
    for title, keys, log in panels:
        if keys is None:
            # A stack for each run: stacks cannot be overlaid.
            for run_dir, records, _ in runs:
                if _timed(records):
                    drawn.append((f"{title}: {run_dir.name}" if several else title,
                                  partial(_draw_time_shares, records=records)))
            continue
        lines = []  # (run index, the key's index among the run's, run name, key, xs, ys)
        for index, (run_dir, records, metric) in enumerate(runs):
            for position, key in enumerate(keys(metric)):
                xs, ys = _series(records, key)
                if xs:
                    lines.append((index, position, run_dir.name if several else "", key, xs, ys))
        if lines:
            drawn.append((title, partial(_draw_lines, lines=lines, log=log)))
    if not drawn:
        raise NoSuchMetric(f"nothing to plot: {', '.join(str(d) for d in run_dirs)} logged no values yet")
    # One column sharing the step axis: a step lines up across every panel.
    fig, axes = plt.subplots(len(drawn), 1, figsize=(9, 0.6 + 2.4 * len(drawn)), sharex=True,
                             squeeze=False, constrained_layout=True)
    for ax, (title, draw) in zip(axes[:, 0], drawn):
        ax.set_title(title)
        draw(ax)
        ax.grid(alpha=0.3)
    if not several:
        fig.suptitle(run_dirs[0].name)
    axes[-1, 0].set_xlabel("step")
    return fig


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if _number(r.get(key))]
    return [x for x, _ in points], [y for _, y in points]


def _draw_lines(ax: Any, lines: list[tuple[int, int, str, str, list[int], list[float]]], log: bool) -> None:
    """A colour for each series of each run (a run's own colours in every panel) and a line style
    for each run; a noisy series faint with its EMA over it; validation points as markers."""
    for index, position, run, key, xs, ys in lines:
        colour = f"C{(_SERIES_PER_RUN * index + position) % 10}"
        style, label = _RUN_STYLES[index % len(_RUN_STYLES)], f"{run} {key}".strip()
        weight = smoothing_weight(len(xs)) if _smoothed(key) else 0.0
        if weight:
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.6, label=f"_{label} raw")
            ys, label = ema(ys, weight), f"{label} (EMA {weight:g})"
        marker = "o" if key.startswith("val/") or len(xs) < 30 else None
        ax.plot(xs, ys, linestyle=style, color=colour, marker=marker, markersize=3.5, linewidth=1.5, label=label)
    if log:
        ax.set_yscale("log")
    _legend(ax)


def _timed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the log intervals that were timed."""
    return [r for r in records if any(_number(r.get(key)) for key in _TIME_SHARES)]


def _draw_time_shares(ax: Any, records: list[dict[str, Any]]) -> None:
    """The shares stacked, each point the mean over a fortieth of the run's log intervals: the shares
    of one interval are noise, and their means still add up to the wall time."""
    from matplotlib.ticker import PercentFormatter

    timed = _timed(records)
    size = math.ceil(len(timed) / 40)
    buckets = [timed[i:i + size] for i in range(0, len(timed), size)]
    xs = [_mean([r["step"] for r in bucket]) for bucket in buckets]
    shares = [[_mean([r.get(key) if _number(r.get(key)) else 0.0 for r in bucket]) for bucket in buckets]
              for key in _TIME_SHARES]
    ax.stackplot(xs, shares, labels=_TIME_SHARES, colors=["C0", "C1", "C2", "C7"], alpha=0.85)
    busy = [(x, _mean([r[_GPU_BUSY] for r in bucket if _number(r.get(_GPU_BUSY))])) for x, bucket in zip(xs, buckets)]
    busy = [(x, y) for x, y in busy if y is not None]
    if busy:
        ax.plot(*zip(*busy), color="k", linestyle="--", label=_GPU_BUSY)
    if size > 1:
        ax.set_title(f"{ax.get_title()} (means of {size} log intervals)")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    _legend(ax, reverse=True)  # top to bottom, as the stack reads


def _legend(ax: Any, reverse: bool = False) -> None:
    """Beside the panel, never over a curve."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, reverse=reverse)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
