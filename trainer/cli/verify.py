"""``trainer verify-resume``: proof, on the user's own config, that a run stopped and resumed trains
exactly as one never stopped (docs/checkpoints.md, "Verify resume on your own setup").

The config trains short in a temporary directory, once uninterrupted and once in parts: killed with
SIGKILL at seeded random steps (one of them inside an accumulation window when
``grad_accum_steps > 1``) and stopped with SIGTERM, each part continued with ``--resume auto``. Then
the batch of every micro-batch, every logged value and every tensor of the final checkpoints are
compared. Each run is a ``trainer run`` in a process of its own (``python -m trainer verify-resume-run``, a hidden command)
with one callback more, ``Probe``, which writes the batches' digests and stops its process at its
step: only these runs pay for it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trainer as package
from trainer import Callback
from trainer.cli.errors import FailedRun, UserError
from trainer.run_dir import CHECKPOINTS, METRICS_JSONL, STATUS

PLAN = "TRAINER_VERIFY_RESUME_PLAN"  # the probe's plan, JSON, in the environment of each run
DEFAULT_STEPS = 50  # a config's max_steps above this is cut to it: the proof needs steps, not a whole run
COMPARED = ("model", "optimizer", "scheduler", "scaler", "callbacks", "states", "trainer_state", "rng")


class Probe(Callback):
    """Writes one JSON line when fit starts (``{"start": step}``) and one per micro-batch (``{"step",
    "micro", "batch"}``, the batch's ``fingerprint``); a line written is the kernel's, so a SIGKILL
    loses none. Sends its own process ``signal`` after optimizer step ``step`` or, with ``in_window``,
    after the first micro-batch of step ``step + 1``. Its plan comes from the environment, so that
    every run of one verification has the same config."""

    def __init__(self):
        plan = json.loads(os.environ[PLAN])
        self.out = open(plan["record"], "a", buffering=1, encoding="utf-8")
        self.stop_step, self.signum, self.in_window = plan.get("step"), plan.get("signal"), plan.get("in_window")
        self.seen = -1

    def on_fit_start(self, trainer) -> None:
        self.seen = trainer.global_step
        self._write({"start": trainer.global_step})

    def on_train_batch_start(self, trainer, batch) -> None:
        from trainer.data.batches import fingerprint

        micro = (trainer.batch_in_epoch - 1) % trainer.config.grad_accum_steps
        self._write({"step": trainer.global_step + 1, "micro": micro, "batch": fingerprint(batch)})

    def on_train_batch_end(self, trainer, outputs, batch) -> None:
        stepped, self.seen = trainer.global_step != self.seen, trainer.global_step
        if trainer.global_step == self.stop_step and stepped != bool(self.in_window):
            os.kill(os.getpid(), self.signum)

    def _write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class Stop:
    """Where a part of the interrupted run ends: ``signum`` after optimizer step ``step`` or, with
    ``in_window``, after the first micro-batch of step ``step + 1``."""

    step: int
    signum: int
    in_window: bool = False

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"{name} after the first micro-batch of step {self.step + 1}" if self.in_window else \
            f"{name} after step {self.step}"


def plan_stops(steps: int, every: int, kills: int, accumulating: bool, seed: int) -> list[Stop]:
    """``kills`` SIGKILLs and one SIGTERM at distinct steps drawn with ``seed``, in step order; after
    the first checkpoint (step ``every``) when there is room, so that each resume restores one. With
    accumulation, one SIGKILL lands inside a window."""
    rng = random.Random(seed)
    candidates = range(every + 1, steps) if steps - every - 1 > kills else range(1, steps)
    if len(candidates) < kills + 1:
        raise UserError(f"--steps {steps}: {kills} kill{'s' * (kills != 1)} and a SIGTERM need distinct steps before "
                        f"the last: give --steps {kills + 2} or more (or fewer --kills)")
    chosen = sorted(rng.sample(candidates, kills + 1))
    signums = [int(signal.SIGKILL)] * kills + [int(signal.SIGTERM)]
    rng.shuffle(signums)
    window = signums.index(int(signal.SIGKILL)) if accumulating else None
    return [Stop(step, signum, i == window) for i, (step, signum) in enumerate(zip(chosen, signums))]


@dataclass
class Finding:
    """Where the resumed run parted from the uninterrupted one: at ``step``, ``what`` (``kind``: batch,
    value or tensor) with the two values."""

    step: int
    kind: str
    what: str
    values: str


@dataclass
class Part:
    """One run's process: its batches' file, the step it started from, whether it ran to the end."""

    label: str
    record: Path
    start: int = 0
    finished: bool = False


def verify(files: list[Path], overrides: list[str], config, steps: int | None, kills: int, seed: int,
           echo: Callable[[str], None] = print) -> Finding | None:
    """Train ``files`` with ``overrides`` (``config``: their validated config) uninterrupted and in
    interrupted parts, compare, print a line per run and the verdict; the finding, or None when every
    resumed part is bit-identical to the uninterrupted run. A run that fails raises UserError (its
    config) or FailedRun."""
    if kills < 1:
        raise UserError(f"--kills {kills}: give 1 or more")
    if steps is not None and steps < 3:
        raise UserError(f"--steps {steps}: give 3 or more")
    steps = steps or min(config.max_steps or DEFAULT_STEPS, DEFAULT_STEPS)
    every = max(1, steps // 4)
    work = Path(tempfile.mkdtemp(prefix="trainer-verify-resume-"))
    ours = [f"out_dir={work}", f"max_steps={steps}", f"checkpoint.every_n_steps={every}", "checkpoint.save_final=true",
            "log_every_n_steps=1", "loggers=[]", "progress=off"]
    echo(f"verify-resume: {steps} steps, a checkpoint every {every}, loggers off, seed {seed}; runs in {work}")
    try:
        finding = _verify(_Runner(files, [*overrides, *ours], work), work, config, kills, seed, every, echo)
    except UserError:
        shutil.rmtree(work, ignore_errors=True)  # the config is wrong: nothing ran to look at
        raise
    if finding is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        echo(f"the runs are kept in {work} (remove it when done)")
    return finding


def _verify(run: _Runner, work: Path, config, kills: int, seed: int, every: int,
            echo: Callable[[str], None]) -> Finding | None:
    """The runs, each compared as soon as it ends: the first finding stops the verification."""
    reference = run("run 1", "uninterrupted", None, resume=False)
    done = _status_step(work / "uninterrupted")
    batches = _lines(reference.record)
    records = _records(work / "uninterrupted")
    micro = sum("step" in r for r in batches)
    echo(f"run 1, uninterrupted: steps 1-{done}, {micro} micro-batches, {len(records)} records logged")
    stops = plan_stops(done, every, kills, config.grad_accum_steps > 1, seed)
    echo(f"stops (--seed {seed}): {', '.join(map(str, stops))}")

    finding, part = None, None
    for i, stop in enumerate([*stops, None]):
        part = run(f"run {i + 2}", "resumed", stop, resume=i > 0)
        finding = _first(_compare_batches(batches, _lines(part.record)),
                         _compare_records(records, _records(work / "resumed"), complete=part.finished))
        ran = "resumed from step" if part.start else "from step"
        ended = "to the end" if stop is None else f"ran to the end, never reaching {stop}" if part.finished else stop
        echo(f"{part.label}, {ran} {part.start}: {ended}: "
             + (f"parted at step {finding.step}" if finding else "same batches and logged values"))
        if finding or part.finished:
            break
    if finding is None:
        finding = _compare_final(work / "uninterrupted", work / "resumed", done)
        echo(f"final checkpoints (step {done}): " + ("differ" if finding else "weights, optimizer, scheduler, scaler, "
                                                    "callbacks, registered state, counters and generators equal bit for bit"))
    if finding is None:
        echo(f"verdict: resume is exact: {kills} SIGKILL{'s' * (kills != 1)} and a SIGTERM, each resumed with "
             "--resume auto, trained bit-identically to the uninterrupted run")
        return None
    echo(f"verdict: {_report(finding, part)}")
    return finding


class _Runner:
    """Starts the runs of one verification: ``trainer run`` with the Probe, in processes of their own."""

    def __init__(self, files: list[Path], overrides: list[str], work: Path):
        self.files, self.overrides, self.work = files, overrides, work

    def __call__(self, label: str, name: str, stop: Stop | None, resume: bool) -> Part:
        file = label.replace(" ", "-")
        part = Part(label, self.work / f"{file}.batches.jsonl")
        plan = {"record": str(part.record)}
        if stop is not None:
            plan.update(step=stop.step, signal=stop.signum, in_window=stop.in_window)
        root = str(Path(package.__file__).resolve().parents[1])  # this trainer, in the runs too
        env = {**os.environ, PLAN: json.dumps(plan),
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "trainer", "verify-resume-run", *(["--resume"] if resume else []),
                   *map(str, self.files), *self.overrides, f"name={name}"]
        log = self.work / f"{file}.log"
        with log.open("w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        expected = {None: 0, signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 128 + signal.SIGTERM}
        if code != expected[stop and stop.signum] and code != 0:
            last = next((line for line in reversed(log.read_text().splitlines()) if line.strip()), "")
            if code == 2:
                raise UserError(last.removeprefix("error: "))
            raise FailedRun(f"{label} of verify-resume failed (exit {code}): {last.removeprefix('error: ')}; "
                            f"its output is in {log}")
        part.start = next((r["start"] for r in _lines(part.record) if "start" in r), 0)
        part.finished = code == 0
        return part


def _lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file; a last line cut short by a kill is left out."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The logged records without the clock, which differs from run to run."""
    from trainer.observability.timing import is_timing

    return [{k: v for k, v in r.items() if not is_timing(k)} for r in _lines(run_dir / METRICS_JSONL)]


def _status_step(run_dir: Path) -> int:
    return json.loads((run_dir / STATUS).read_text(encoding="utf-8"))["step"]


def _first(*findings: Finding | None) -> Finding | None:
    """The earliest finding; at one step, the first given (a batch explains the values it gave)."""
    found = [f for f in findings if f is not None]
    return min(found, key=lambda f: f.step) if found else None


def _compare_batches(reference: list[dict[str, Any]], part: list[dict[str, Any]]) -> Finding | None:
    expected = {(r["step"], r["micro"]): r["batch"] for r in reference if "step" in r}
    for r in part:
        if "step" not in r:
            continue
        key = (r["step"], r["micro"])
        if key not in expected:
            return Finding(r["step"], "batch", f"micro-batch {r['micro']}", "the uninterrupted run trained no such step")
        if r["batch"] != expected[key]:
            return Finding(r["step"], "batch", f"the batch (micro-batch {r['micro']})",
                           f"digest {expected[key]} (uninterrupted) vs {r['batch']} (resumed)")
    return None


def _compare_records(reference: list[dict[str, Any]], resumed: list[dict[str, Any]], complete: bool) -> Finding | None:
    """The resumed run's records against the uninterrupted run's, in order; with ``complete``, all of them."""
    for want, got in zip(reference, resumed):
        if want != got:
            key = next(k for k in [*want, *got] if want.get(k, None) != got.get(k, None) or (k in want) != (k in got))
            step = min(want.get("step", 0), got.get("step", 0))
            return Finding(step, "value", key, f"{_shown(want, key)} (uninterrupted) vs {_shown(got, key)} (resumed)")
    if len(resumed) > len(reference):
        extra = resumed[len(reference)]
        return Finding(extra.get("step", 0), "value", "a record", f"{extra} logged by the resumed run only")
    if complete and len(resumed) < len(reference):
        missing = reference[len(resumed)]
        return Finding(missing.get("step", 0), "value", "a record", f"{missing} logged by the uninterrupted run only")
    return None


def _shown(record: dict[str, Any], key: str) -> str:
    return repr(record[key]) if key in record else "nothing"


def _compare_final(reference: Path, resumed: Path, step: int) -> Finding | None:
    """The final checkpoints of both runs, tensor for tensor."""
    from trainer.checkpoint import load_checkpoint

    name = f"step-{step:08d}.pt"
    want, got = (load_checkpoint(run_dir / CHECKPOINTS / name) for run_dir in (reference, resumed))
    names = [n for groups in want["trainer_state"].get("optimizer_params", [[]])[:1] for group in groups
             for n, _ in group]
    for part in COMPARED:
        found = _difference(want.get(part), got.get(part), (part,))
        if found is not None:
            path, values = found
            return Finding(step, "tensor", _tensor_name(path, names), values)
    return None


def _difference(a: Any, b: Any, path: tuple) -> tuple[tuple, str] | None:
    """The first path where ``a`` and ``b`` differ (dtypes included), and the two values in short."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
                and a.shape == b.shape and torch.equal(a, b):
            return None
        return path, f"{_short(a)} (uninterrupted) vs {_short(b)} (resumed)"
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                return path + (key,), f"{'missing' if key not in a else 'present'} in the uninterrupted run's, " \
                                      f"{'missing' if key not in b else 'present'} in the resumed run's"
            found = _difference(a[key], b[key], path + (key,))
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _difference(x, y, path + (i,))
            if found is not None:
                return found
        return None
    return None if a == b else (path, f"{a!r} (uninterrupted) vs {b!r} (resumed)")


def _short(value: Any) -> str:
    import torch

    if not isinstance(value, torch.Tensor):
        return repr(value)
    if value.numel() == 1:
        return f"{value.item()!r}"
    return f"a {value.dtype} tensor of shape {list(value.shape)}, sum {value.double().sum().item():.9g}"


def _tensor_name(path: tuple, params: list[str]) -> str:
    """``optimizer state 'exp_avg' of 'net.0.weight'`` for an optimizer's per-parameter state; the
    dotted path otherwise."""
    if path[:2] == ("optimizer", "state") and len(path) >= 4 and isinstance(path[2], int) and path[2] < len(params):
        return f"optimizer state '{path[3]}' of parameter '{params[path[2]]}'"
    if path[0] == "model" and len(path) == 2:
        return f"model tensor '{path[1]}'"
    return ".".join(map(str, path))


def _report(finding: Finding, part: Part) -> str:
    """The finding in one paragraph: where the runs parted, what, the likely cause and the fix."""
    where = ("before any stop, in a run that had not been resumed" if part.start == 0 else
             f"in {part.label}, resumed from the checkpoint of step {part.start}"
             + (" (the first step it trained)" if finding.step == part.start + 1 else ""))
    head = f"NOT EXACT: the runs part at step {finding.step}, {where}: {finding.what}: {finding.values}"
    if part.start == 0:
        return (f"{head}. Likely cause: the run is not deterministic by itself (two runs of one config differ before "
                "any resume): a generator that the seed does not reach (random.Random(), numpy.random.default_rng() "
                "without a seed, a seed from the clock) or a nondeterministic kernel. Fix: draw from generators seeded "
                "by the config's seed, and set deterministic: true")
    if finding.kind == "batch":
        return (f"{head}. Likely cause: data drawn from a generator the checkpoint does not hold: a data function or "
                "dataset with random numbers of its own (an unseeded random.Random or numpy Generator, torch.randn "
                "without a generator at each epoch, augmentation in __getitem__ under workers), or a loader whose "
                "position is not restored. Fix: derive the randomness from (seed, epoch, index), or give the loader "
                "state_dict() and load_state_dict() (docs/data.md)")
    if finding.kind == "tensor" and finding.what.startswith("callbacks."):
        return (f"{head}. Likely cause: that callback keeps state its state_dict() does not return. Fix: return all of "
                "it from state_dict() and take it back in load_state_dict()")
    same = "; the batches were the same" if finding.kind == "value" else ""
    return (f"{head}{same}. Likely cause: state outside the checkpoint that training reads: an attribute of a module "
            "that is not a parameter or buffer (a counter, a cache), an attribute of the Trainer subclass, or a "
            "callback without state_dict(). Fix: keep it in a buffer (self.register_buffer(name, tensor)), register "
            "the object with trainer.register_state(name, obj), or give the callback state_dict() and "
            "load_state_dict()")
