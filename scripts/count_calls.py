"""What the Trainer adds to each optimizer step, counted rather than timed.

Wall-clock ratios on a shared VM swing by +-20% from run to run (docs/performance.md); counts do not.
This runs the raw loop and the Trainer over the same steps of a workload of bench_overhead.py
under ``sys.setprofile`` and prints the Python-level and C-level calls per step of each, the
Trainer's extra calls by function, and the measured cost of the Trainer's per-step bookkeeping
functions (``timeit``, outside the profiler).

    python scripts/count_calls.py                 # tiny, logging and per-layer grad norms every 50 steps
    python scripts/count_calls.py --workload small --steps 200
"""

from __future__ import annotations

import argparse
import collections
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as bench  # noqa: E402


def count(fn) -> collections.Counter:
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls["python"] += 1
            calls[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
        elif event == "c_call":
            calls["C"] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(bench.WORKLOADS), default="tiny")
    parser.add_argument("--steps", type=int, default=500, help="a multiple of 50, the log interval")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    model, optimizer, pool, _, _ = bench.build(args.workload, "cpu")
    loss_of = bench.loss_fn(args.workload)
    batches = [pool[i % len(pool)] for i in range(args.steps)]
    bench.raw_loop(model, optimizer, batches[:50], loss_of, True, False)  # warm both paths first
    bench.make_trainer(model, optimizer, batches[:50], loss_of, "logging").fit()
    raw = count(lambda: bench.raw_loop(model, optimizer, batches, loss_of, True, False))
    trainer = bench.make_trainer(model, optimizer, batches, loss_of, "logging")
    ours = count(trainer.fit)

    n = args.steps
    print(f"{args.workload}, {n} steps, loss and per-layer gradient norms logged every {bench.LOG_EVERY}:")
    print("  calls per step   python   C")
    print(f"  raw loop         {raw['python'] / n:6.1f} {raw['C'] / n:6.1f}")
    print(f"  Trainer          {ours['python'] / n:6.1f} {ours['C'] / n:6.1f}")
    print("  the Trainer's extra Python calls per step, by function (>= 0.1):")
    extra = {k: (v - raw.get(k, 0)) / n for k, v in ours.items() if k not in ("python", "C")}
    for name, per_step in sorted(extra.items(), key=lambda kv: -kv[1]):
        if per_step >= 0.1:
            print(f"    {per_step:5.2f}  {name}")

    # The bookkeeping around forward/backward/step, timed on its own (a step that is not a log point).
    x, y = batches[0]
    loss = loss_of(model(x), y).detach()
    trainer.global_step = 7
    guard, telemetry = trainer._guard, trainer._telemetry

    def bookkeeping():
        telemetry.computed((x, y), loss, loss)
        step_loss, _ = telemetry.step_loss()
        telemetry.stepped(guard.check(step_loss, None, 8, step_loss), 8)
        trainer._after_step()

    per_call = min(timeit.repeat(bookkeeping, number=20000, repeat=5)) / 20000 * 1e6
    print(f"  telemetry + non-finite check + _after_step: {per_call:.2f} us per step (timeit, best of 5)")


if __name__ == "__main__":
    main()
