"""The Trainer against the hand-written loop in executed CPU instructions, under valgrind's callgrind.

Wall-clock ratios on a shared VM swing by +-20% from one process to the next (docs/performance.md);
instruction counts do not: the same steps execute the same instructions, whatever else the machine
is doing. This is how PyTorch measures its own per-call overhead
(``torch.utils.benchmark.Timer.collect_callgrind``). An instruction count is a proxy for time, not
time: it sees no cache misses or stalls, but the Trainer's extra work is interpreter code of the
same kind as the raw loop's Python, so the ratios carry over.

A valgrind process (starting it costs a few minutes: importing torch under valgrind is slow)
runs, for each workload and variant of ``bench_overhead.py``, the raw loop and ``Trainer.fit()``
over N and over 2N steps, collecting only inside those calls. The difference between the 2N and
N runs is N steady-state steps; what remains of the N run is the fixed cost of one call.

The same steps do not execute exactly the same instructions every time. Within a process the
allocator's and the interpreter's state differ from round to round, so each case is measured
``--rounds`` times. Between processes, where the interpreter's objects land in memory moves the
count further: the same code in the same process counts the same, but with a longer environment
(which shifts every later allocation) it can count 0.2 points of ratio apart. So ``--layouts``
processes run, each with its environment padded by a different length, side by side; the median
round over all of them is printed with the range of every round's ratio, and each process's median.

    python scripts/count_instructions.py                  # tiny, plain and logging (about 10 minutes)
    python scripts/count_instructions.py --case empty:logging --steps 400
    python scripts/count_instructions.py --case tiny:logging --keep /tmp/cg   # then callgrind_annotate /tmp/cg/...

Needs valgrind (``apt-get install valgrind``). The progress-bar variant is left out by default:
tqdm redraws on a timer, and valgrind's ~50x slowdown makes it redraw far more often per step.
``small`` runs, but slowly (about 13 s per step under valgrind, an hour for one case): the Trainer's
extra instructions per step do not depend on the model, so ``tiny``, whose step is shortest, bounds
its ratio from above.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as bench  # noqa: E402

CASES = ("tiny:plain", "tiny:logging")
STEPS = {"tiny": 200, "small": 50, "empty": 400}  # N; multiples of the log interval (50)
LAYOUT_STEP = 1000  # bytes of environment added per layout: where the interpreter's objects land


def child(cases: list[str], steps: int | None, rounds: int) -> None:
    import torch

    torch.set_num_threads(1)
    for case in cases:
        workload, variant = case.split(":")
        n = steps or STEPS[workload]
        model, optimizer, pool, _, _ = bench.build(workload, "cpu")
        loss_of = bench.loss_fn(workload)
        log, progress = variant in ("logging", "progress"), variant == "progress"

        def run(kind: str, count: int):
            batches = [pool[i % len(pool)] for i in range(count)]
            if kind == "raw":
                return lambda: bench.raw_loop(model, optimizer, batches, loss_of, log, progress)
            return bench.make_trainer(model, optimizer, batches, loss_of, variant).fit

        run("raw", bench.LOG_EVERY)()  # warm both paths: lazy imports, first-call caches
        run("trainer", bench.LOG_EVERY)()
        phases = (("raw", n), ("trainer", n), ("raw", 2 * n), ("trainer", 2 * n)) * rounds
        for kind, count in phases:
            fn = run(kind, count)
            # Each phase starts with the cyclic collector in the same state: a collection that the
            # previous phase's allocations left pending (millions of instructions) would otherwise
            # land in this one and move its steady state by 1% or more.
            gc.collect()
            torch._C._valgrind_toggle()  # start collecting
            fn()
            torch._C._valgrind_toggle_and_dump_stats()  # stop, and write this phase's counts
            print(json.dumps({"workload": workload, "variant": variant, "kind": kind, "steps": count}), flush=True)


def instructions(path: Path) -> int:
    match = re.search(r"^summary: (\d+)", path.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"no 'summary:' line in {path}: did callgrind write it?")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", metavar="WORKLOAD:VARIANT",
                        help=f"workload ({', '.join(bench.WORKLOADS)}) and variant ({', '.join(bench.VARIANTS)}); "
                             f"default: {' '.join(CASES)}")
    parser.add_argument("--steps", type=int, help="N, a multiple of 50 (default: tiny 200, small 50)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure each case this many times in each process")
    parser.add_argument("--layouts", type=int, default=2,
                        help="measure in this many processes, each with its memory laid out differently "
                             "(a longer environment); the median and range are over every round of every one")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep callgrind's files of each phase in DIR (callgrind_annotate reads them)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = args.case or list(CASES)
    for case in cases:
        workload, _, variant = case.partition(":")
        if workload not in bench.WORKLOADS or variant not in bench.VARIANTS:
            parser.error(f"--case {case!r}: expected WORKLOAD:VARIANT, workload one of {list(bench.WORKLOADS)}, "
                         f"variant one of {list(bench.VARIANTS)}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    if args.layouts < 1:
        parser.error(f"--layouts {args.layouts}: must be at least 1")
    if args.steps is not None and (args.steps <= 0 or args.steps % bench.LOG_EVERY):
        parser.error(f"--steps {args.steps}: must be a positive multiple of {bench.LOG_EVERY}, the log interval")
    if args.child:
        child(cases, args.steps, args.rounds)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: install it (Debian: apt-get install valgrind)")

    # Each layout is one valgrind process, run side by side, one a core.
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = [pool.submit(measure, Path(tmp) / f"layout-{i}", i * LAYOUT_STEP, cases, args.steps, args.rounds,
                            args.keep) for i in range(args.layouts)]
        by_layout = [run.result() for run in runs]

    import platform

    print(f"# callgrind instruction counts, {platform.machine()}, python {platform.python_version()}, 1 thread, "
          f"{args.layouts} layout(s) x {args.rounds} round(s)")
    print(f"{'workload':<9} {'variant':<9} {'raw Ir/step':>12} {'trainer Ir/step':>16} {'ratio':>7} "
          f"{'range':>13} {'fit() fixed Ir':>15} {'ratio at N':>11}   per layout")
    per_case = len(by_layout[0]) // len(cases)
    for start in range(0, len(by_layout[0]), per_case):
        rounds, medians = [], []
        for phases in by_layout:
            mine = [round_of(phases[first:first + 4]) for first in range(start, start + per_case, 4)]
            medians.append(sorted(mine)[len(mine) // 2][0])
            rounds += mine
        ratio, raw, ours, fixed, at_n = sorted(rounds)[len(rounds) // 2]  # the median round of all
        spread = f"{min(r[0] for r in rounds):.4f}-{max(r[0] for r in rounds):.4f}"
        case = by_layout[0][start]
        print(f"{case['workload']:<9} {case['variant']:<9} {raw:>12,.0f} {ours:>16,.0f} {ratio:>7.4f} {spread:>13} "
              f"{fixed:>15,.0f} {at_n:>11.4f}   {' '.join(f'{m:.4f}' for m in medians)}   (N = {case['steps']})")


def measure(out: Path, padding: int, cases: list[str], steps: int | None, rounds: int, keep: Path | None) -> list[dict]:
    """One valgrind process over ``cases``, its environment ``padding`` bytes longer: the phases it
    ran, each with its instruction count."""
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=yes",
               "--collect-atstart=no", sys.executable, __file__, "--child"]
    command += [a for case in cases for a in ("--case", case)]
    command += ["--steps", str(steps)] if steps else []
    command += ["--rounds", str(rounds)]
    # String hashes seeded the same in every run: dict probing, and so the counts, repeat exactly
    # for the same command in the same environment.
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0"), "COUNT_LAYOUT": "x" * padding}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the run under valgrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
    phases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for i, phase in enumerate(phases, start=1):  # callgrind numbers its dumps from 1, in order
        phase["ir"] = instructions(Path(f"{out}.{i}"))
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for i, phase in enumerate(phases, start=1):
            name = (f"{out.name}-{i:02d}-{phase['workload']}-{phase['variant']}-{phase['kind']}-{phase['steps']}"
                    ".callgrind")
            shutil.copy(f"{out}.{i}", keep / name)
    return phases


def round_of(phases: list[dict]) -> tuple[float, float, float, float, float]:
    """One round's raw N, trainer N, raw 2N and trainer 2N phases: the ratio of steady-state steps,
    raw and trainer Ir per step, a ``fit()`` call's fixed Ir, and the ratio of the whole N-step runs."""
    raw_n, ours_n, raw_2n, ours_2n = phases
    n = raw_n["steps"]
    raw, ours = (raw_2n["ir"] - raw_n["ir"]) / n, (ours_2n["ir"] - ours_n["ir"]) / n
    return ours / raw, raw, ours, ours_n["ir"] - n * ours, ours_n["ir"] / raw_n["ir"]


if __name__ == "__main__":
    main()
