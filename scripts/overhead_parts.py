"""Where the Trainer's extra time per step goes on the tiny workload: the Trainer with parts of its
per-step work turned off, against the hand-written loop of ``bench_overhead.py``.

A diagnostic, not a benchmark of anything users run: the parts are turned off by replacing the
Trainer's internals in the measuring process. Each measurement is a fresh process on one CPU
thread pinned to one core, the variants interleaved (their order reversed every other round);
printed: the median time per step and the median and range of the ratios to the round's ``raw``.

    python scripts/overhead_parts.py --repeats 7

Variants (loss and per-layer gradient norms logged every 50 steps in all of them):
  raw             the hand-written loop
  raw+check       the hand-written loop with the Trainer's exact check of the loss and the gradients
                  (one fused non-finite check over them, read on the host)
  raw-in-trainer  the hand-written loop, in a process that built and ran a Trainer first (what the
                  process alone costs: imports, memory layout)
  trainer         the Trainer
  no-grad-check   the Trainer without the gradient check (the loss is still checked)
  no-phase-clock  that, and no clock reading per step (time/data, time/compute shares)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead as bench  # noqa: E402  (also puts this checkout's trainer first on the path)

VARIANTS = ("raw", "raw+check", "raw-in-trainer", "trainer", "no-grad-check", "no-phase-clock")


class CheckedSteps:
    """The raw loop's optimizer and loss function, with the Trainer's exact check between backward
    and the step: one fused non-finite check over the gradients, and the loss and that flag read on
    the host."""

    def __init__(self, optimizer, loss_of, params):
        import torch

        self.optimizer, self.loss_of, self.params = optimizer, loss_of, params
        self.found, self.one = torch.zeros(()), torch.ones(())
        self.loss = None

    def loss_fn(self, output, target):
        self.loss = self.loss_of(output, target)
        return self.loss

    def step(self) -> None:
        import torch

        grads = [p.grad for p in self.params if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self.one)
        if not math.isfinite(self.loss.item()) or self.found.item():
            raise FloatingPointError("a step is not finite")
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def without_grad_check(trainer) -> None:
    if not isinstance(getattr(trainer._step, "check_grads", None), bool):
        raise SystemExit("overhead_parts.py: OptimizerStep.check_grads is gone; update without_grad_check")
    trainer._step.check_grads = False  # the step's value is then its loss alone


def without_phase_clock(trainer) -> None:
    telemetry = trainer._telemetry
    if not all(callable(getattr(telemetry, name, None)) for name in ("batches", "computed", "stepped")):
        raise SystemExit("overhead_parts.py: the telemetry's per-step calls changed; update without_phase_clock")
    interval = telemetry.interval
    telemetry.batches = lambda source, move: source  # CPU batches are not moved
    telemetry.computed = types.MethodType(lambda self, batch, outputs, loss=None, count=None:
                                          interval.track(loss, outputs, batch), telemetry)
    telemetry.stepped = types.MethodType(lambda self, skipped, step: interval.end_step(skipped), telemetry)


def child(variant: str, steps: int | None) -> float:
    import torch

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {os.cpu_count() - 1})
    model, optimizer, pool, default_steps, warm = bench.build("tiny", "cpu")
    steps = steps or default_steps
    loss_of = bench.loss_fn("tiny")
    batches = [pool[i % len(pool)] for i in range(steps)]
    warm_batches = batches[:min(warm, steps)]
    if variant.startswith("raw"):
        if variant == "raw+check":
            checked = CheckedSteps(optimizer, loss_of, [p for p in model.parameters() if p.requires_grad])

            def run(data):
                bench.raw_loop(model, checked, data, checked.loss_fn, log=True, progress=False)
        else:
            def run(data):
                bench.raw_loop(model, optimizer, data, loss_of, log=True, progress=False)
        if variant == "raw-in-trainer":
            bench.make_trainer(model, optimizer, warm_batches, loss_of, "logging").fit()
        run(warm_batches)
        start = time.perf_counter()
        run(batches)
        return (time.perf_counter() - start) / steps
    bench.make_trainer(model, optimizer, warm_batches, loss_of, "logging").fit()
    trainer = bench.make_trainer(model, optimizer, batches, loss_of, "logging")
    if variant in ("no-grad-check", "no-phase-clock"):
        without_grad_check(trainer)
    if variant == "no-phase-clock":
        without_phase_clock(trainer)
    start = time.perf_counter()
    trainer.fit()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="default: all; raw always runs")
    parser.add_argument("--steps", type=int, help="measured steps per run (default: bench_overhead's 3,000)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.child, args.steps))
        return
    variants = ["raw", *[v for v in (args.variant or VARIANTS) if v != "raw"]]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.repeats):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", variant]
                                 + (["--steps", str(args.steps)] if args.steps else []),
                                 capture_output=True, text=True, check=True)
            times[variant].append(float(out.stdout.split()[-1]) * 1e6)
    print(f"# tiny, logging every {bench.LOG_EVERY} steps, 1 thread, median of {args.repeats} interleaved runs")
    print(f"{'variant':<15} {'us/step':>8} {'ratio':>7} {'range':>12}")
    for variant in variants:
        ratios = sorted(t / r for t, r in zip(times[variant], times["raw"]))
        print(f"{variant:<15} {statistics.median(times[variant]):>8.1f} {statistics.median(ratios):>7.3f} "
              f"{ratios[0]:>5.3f}-{ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
