"""Reading run directories back: the status file, ``trainer runs`` and ``trainer plot``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from trainer.run_dir import CONFIG, METRICS_JSONL, STATUS, checkpoint_dir, list_checkpoints


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    """``running`` (with the pid) when a run starts; ``finished``, ``interrupted`` or ``failed`` when it ends."""
    data = {"status": status, "pid": os.getpid(), **extra}
    tmp = run_dir / f".{STATUS}.tmp"
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, run_dir / STATUS)


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: Path) -> str:
    path = run_dir / STATUS
    if not path.exists():
        return "unknown"
    data = json.loads(path.read_text(encoding="utf-8"))
    status = data["status"]
    if not isinstance(status, str):
        raise ValueError(f"{STATUS} holds status {status!r}")
    if status == "running" and not _alive(int(data.get("pid", -1))):
        return "interrupted"  # killed without a chance to say so (SIGKILL, power loss)
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
                         "checkpoint": "-", "problem": " ".join(f"{type(exc).__name__}: {exc}".split())})
    return rows


def _row(run_dir: Path) -> dict[str, Any]:
    records = read_records(run_dir)
    metric, mode = monitored(records, run_dir)
    values = [r[metric] for r in records if metric in r and isinstance(r[metric], (int, float))]
    best = (max if mode == "max" else min)(values) if values else None
    checkpoints = list_checkpoints(checkpoint_dir(run_dir))
    return {
        "name": run_dir.name,
        "status": run_status(run_dir),
        "steps": max((int(r["step"]) for r in records), default=0),
        "metric": metric or "-",
        "best": best,
        "checkpoint": checkpoints[-1].name if checkpoints else "-",
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["name", "status", "steps", "monitored", "best", "newest checkpoint"]
    lines = [[r["name"], r["status"], str(r["steps"]), r["metric"],
              "-" if r["best"] is None else f"{r['best']:.4g}", r["checkpoint"]] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    notes = [f"{r['name']}: {r['problem']}" for r in rows if r.get("problem")]
    return "\n".join([fmt.format(*header).rstrip()] + [fmt.format(*line).rstrip() for line in lines] + notes)


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Train/val loss, the monitored metric, LR and total gradient norm against step; runs overlaid."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("trainer plot needs matplotlib: pip install 'trainer[plot]' (or pip install matplotlib)") from None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [(axes[0][0], "loss"), (axes[0][1], None), (axes[1][0], "lr"), (axes[1][1], "grad_norm/total")]
    for index, run_dir in enumerate(run_dirs):
        color = f"C{index % 10}"  # one colour per run; val dashed
        try:
            records = read_records(run_dir)
            metric, _ = monitored(records, run_dir)
        except _DAMAGE as exc:
            raise UnreadableRun(f"{run_dir}: unreadable run: {type(exc).__name__}: {exc}") from None
        for ax, name in panels:
            keys = ["train/loss", "val/loss"] if name == "loss" else [name or metric]
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))
                          and math.isfinite(r[key])]
                if points:
                    xs, ys = zip(*points)
                    style = "--" if key == "val/loss" else "-"
                    ax.plot(xs, ys, style, color=color, marker="o" if len(xs) < 30 else None, markersize=3,
                            label=f"{run_dir.name} {key}")
    titles = ["loss", "monitored metric", "learning rate", "total gradient norm"]
    for (ax, name), title in zip(panels, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
        if name in ("loss", "grad_norm/total") and ax.lines:
            ax.set_yscale("log")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
