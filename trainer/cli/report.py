"""Reading run directories back: the status file, ``trainer runs`` and ``trainer plot``."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

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
    if data["status"] == "running" and not _alive(int(data.get("pid", -1))):
        return "interrupted"  # killed without a chance to say so (SIGKILL, power loss)
    return data["status"]


def monitored(records: list[dict[str, Any]], run_dir: Path) -> tuple[str | None, str]:
    """The metric to rank by: the config's EarlyStopping/BestCheckpoint ``monitor``, else val/acc, else val/loss."""
    config = run_dir / CONFIG
    if config.exists():
        match = re.search(r"monitor:\s*['\"]?([\w/.-]+)", config.read_text(encoding="utf-8"))
        mode = re.search(r"mode:\s*(min|max)", config.read_text(encoding="utf-8"))
        if match:
            return match.group(1), mode.group(1) if mode else "min"
    names = {k for r in records for k in r}
    for name, mode in (("val/acc", "max"), ("val/loss", "min")):
        if name in names:
            return name, mode
    return None, "min"


def runs_table(out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for run_dir in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        if not (run_dir / METRICS_JSONL).exists() and not (run_dir / STATUS).exists():
            continue
        records = read_records(run_dir)
        metric, mode = monitored(records, run_dir)
        values = [r[metric] for r in records if metric in r and isinstance(r[metric], (int, float))]
        best = (max if mode == "max" else min)(values) if values else None
        checkpoints = list_checkpoints(checkpoint_dir(run_dir))
        rows.append({
            "name": run_dir.name,
            "status": run_status(run_dir),
            "steps": max((int(r["step"]) for r in records), default=0),
            "metric": metric or "-",
            "best": best,
            "checkpoint": checkpoints[-1].name if checkpoints else "-",
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["name", "status", "steps", "monitored", "best", "newest checkpoint"]
    lines = [[r["name"], r["status"], str(r["steps"]), r["metric"],
              "-" if r["best"] is None else f"{r['best']:.4g}", r["checkpoint"]] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines])


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
        records = read_records(run_dir)
        metric, _ = monitored(records, run_dir)
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
