"""The Trainer against the hand-written loop in executed CPU instructions, under valgrind's callgrind.

Wall-clock ratios on a shared VM swing by +-20% from one process to the next (docs/performance.md);
instruction counts do not: the same steps execute the same instructions, whatever else the machine
is doing. This is how PyTorch measures its own per-call overhead
(``torch.utils.benchmark.Timer.collect_callgrind``). An instruction count is a proxy for time, not
time: it sees no cache misses or stalls, but the Trainer's extra work is interpreter code of the
same kind as the raw loop's Python, so the ratios carry over.

One valgrind process (starting it costs a few minutes: importing torch under valgrind is slow)
runs, for each workload and variant of ``bench_overhead.py``, the raw loop and ``Trainer.fit()``
over N and over 2N steps, collecting only inside those calls. The difference between the 2N and
N runs is N steady-state steps; what remains of the N run is the fixed cost of one call. The same
steps do not execute exactly the same instructions in every round (the allocator's and the
interpreter's state differ): each case is measured ``--rounds`` times in the one process, and the
median round is printed with the range of the rounds' ratios.

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as bench  # noqa: E402

CASES = ("tiny:plain", "tiny:logging")
STEPS = {"tiny": 200, "small": 50, "empty": 400}  # N; multiples of the log interval (50)


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
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure each case this many times in the one process; the median is reported")
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
    if args.steps is not None and (args.steps <= 0 or args.steps % bench.LOG_EVERY):
        parser.error(f"--steps {args.steps}: must be a positive multiple of {bench.LOG_EVERY}, the log interval")
    if args.child:
        child(cases, args.steps, args.rounds)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: install it (Debian: apt-get install valgrind)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=yes",
                   "--collect-atstart=no", sys.executable, __file__, "--child"]
        command += [a for case in cases for a in ("--case", case)]
        command += ["--steps", str(args.steps)] if args.steps else []
        command += ["--rounds", str(args.rounds)]
        # String hashes seeded the same in every run: dict probing, and so the counts, repeat exactly
        # for the same command.
        env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the run under valgrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
        phases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        for i, phase in enumerate(phases, start=1):  # callgrind numbers its dumps from 1, in order
            phase["ir"] = instructions(Path(f"{out}.{i}"))
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for i, phase in enumerate(phases, start=1):
                name = f"{i:02d}-{phase['workload']}-{phase['variant']}-{phase['kind']}-{phase['steps']}.callgrind"
                shutil.copy(f"{out}.{i}", args.keep / name)

    import platform

    print(f"# callgrind instruction counts, {platform.machine()}, python {platform.python_version()}, 1 thread")
    print(f"{'workload':<9} {'variant':<9} {'raw Ir/step':>12} {'trainer Ir/step':>16} {'ratio':>7} "
          f"{'rounds':>13} {'fit() fixed Ir':>15} {'ratio at N':>11}")
    per_case = len(phases) // len(cases)
    for start in range(0, len(phases), per_case):
        rounds = []
        for first in range(start, start + per_case, 4):
            raw_n, ours_n, raw_2n, ours_2n = phases[first:first + 4]
            n = raw_n["steps"]
            raw, ours = (raw_2n["ir"] - raw_n["ir"]) / n, (ours_2n["ir"] - ours_n["ir"]) / n
            rounds.append((ours / raw, raw, ours, ours_n["ir"] - n * ours, ours_n["ir"] / raw_n["ir"]))
        ratio, raw, ours, fixed, at_n = sorted(rounds)[len(rounds) // 2]  # the median round
        spread = f"{min(r[0] for r in rounds):.4f}-{max(r[0] for r in rounds):.4f}"
        case = phases[start]
        print(f"{case['workload']:<9} {case['variant']:<9} {raw:>12,.0f} {ours:>16,.0f} {ratio:>7.4f} {spread:>13} "
              f"{fixed:>15,.0f} {at_n:>11.4f}   (N = {case['steps']}, {len(rounds)} rounds)")


if __name__ == "__main__":
    main()
