"""Per-step overhead of the Trainer against a hand-written loop on the same model, data and seed.

Each measurement runs in a fresh subprocess (one CPU thread), raw and Trainer interleaved
(raw, trainer, raw, trainer, ...) after a warm-up; the median time per step and the ratio are
printed. Nothing here is asserted: the numbers go to docs/performance.md.

    python scripts/bench_overhead.py                       # every workload and variant
    python scripts/bench_overhead.py --workload tiny --variant logging --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The trainer package of this checkout, not whichever one the environment installed (an editable
# install points at one worktree; a measurement of another would time that one's code).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS = {
    # name: (layer sizes, batch, measured steps, warm-up steps)
    "empty": ((4, 2), 8, 5000, 500),  # a step that is nearly all Python: the framework's own cost
    "tiny": ((32, 64, 64, 10), 64, 3000, 300),
    "small": ((784, 512, 512, 10), 128, 600, 60),
}
VARIANTS = ("plain", "logging", "progress")
LOG_EVERY = 50


def build(workload: str, device: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if workload == "char_lm":
        from trainer.examples.char_lm import CharTransformer, load

        model = CharTransformer(block_size=128, d_model=128, n_layers=4, n_heads=4, dropout=0.0).to(device)
        data = load(block_size=128, max_bytes=400_000)["train"].tensors
        batch = 16 if device == "cpu" else 64
        pool = [(data[0][i * batch:(i + 1) * batch].to(device), data[1][i * batch:(i + 1) * batch].to(device))
                for i in range(len(data[0]) // batch)]
        steps, warm = (60, 10) if device == "cpu" else (300, 30)
    else:
        sizes, batch, steps, warm = WORKLOADS[workload]
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1]).to(device)
        g = torch.Generator().manual_seed(1)
        pool = [(torch.randn(batch, sizes[0], generator=g).to(device),
                 torch.randint(0, sizes[-1], (batch,), generator=g).to(device)) for _ in range(100)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # what the config builder picks
    return model, optimizer, pool, steps, warm


def loss_fn(workload: str):
    from torch.nn import functional as F

    if workload == "char_lm":
        from trainer.examples.char_lm import lm_loss

        return lm_loss
    return F.cross_entropy


def raw_loop(model, optimizer, batches, loss_of, log: bool, progress: bool, module=None, autocast=None):
    """The hand-written loop, doing the same bookkeeping the Trainer's variant does."""
    import contextlib

    import torch

    autocast = autocast if autocast is not None else contextlib.nullcontext()
    module = module if module is not None else model
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), file=sys.stderr)
    running = None
    named = list(module.named_parameters())
    for step, (x, y) in enumerate(batches, start=1):
        with autocast:
            loss = loss_of(model(x), y)
        loss.backward()
        if log and step % LOG_EVERY == 0:
            norms = torch.stack(torch._foreach_norm([p.grad for _, p in named]))
            total = torch.linalg.vector_norm(norms)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.detach() if running is None else running + loss.detach()
        if log and step % LOG_EVERY == 0:
            torch.stack([running / LOG_EVERY, total, *norms]).tolist()  # the log point's one host copy
            running = None
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()


def make_trainer(model, optimizer, batches, loss_of, variant: str, device: str = "cpu", precision: str = "fp32",
                 compile_: bool = False):
    """The Trainer doing a variant's bookkeeping over ``batches`` (one step each), no evaluation."""
    from trainer import ProgressBar, Trainer

    log = variant in ("logging", "progress")
    config = {
        "device": device, "max_steps": len(batches), "progress": "off", "eval_every_n_epochs": None,
        "precision": precision, "compile": compile_,
        "log_every_n_steps": LOG_EVERY if log else 10**9,
        "grad_logging": {"every_n_steps": LOG_EVERY, "per_layer": True} if log else {},
    }
    callbacks = [ProgressBar(force=True)] if variant == "progress" else []
    return Trainer(model, optimizer, batches, loss_fn=loss_of, callbacks=callbacks, config=config)


def child(kind: str, workload: str, variant: str, device: str, precision: str, compile_: bool) -> float:
    import os

    import torch

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {os.cpu_count() - 1})  # every measurement on the same core
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # what the Trainer turns on, for both sides
        torch.backends.cudnn.allow_tf32 = True
    model, optimizer, pool, steps, warm = build(workload, device)
    loss_of = loss_fn(workload)
    batches = [pool[i % len(pool)] for i in range(steps)]
    warm_batches = batches[:warm]
    log, progress = variant in ("logging", "progress"), variant == "progress"
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    if kind == "raw":
        import contextlib

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()
        forward = torch.compile(model) if compile_ else model

        def run(data):
            raw_loop(forward, optimizer, data, loss_of, log, progress, model, autocast)

        run(warm_batches)
        sync()
        start = time.perf_counter()
        run(batches)
        sync()
        return (time.perf_counter() - start) / steps

    def make(data):
        return make_trainer(model, optimizer, data, loss_of, variant, device, precision, compile_)

    warm_trainer = make(warm_batches)
    warm_trainer.fit()
    trainer = make(batches)
    if compile_:
        trainer.model = warm_trainer.model  # compiled once, as the raw loop does
    sync()
    start = time.perf_counter()
    trainer.fit()
    sync()
    return (time.perf_counter() - start) / steps


def measure(workload: str, variant: str, repeats: int, device: str, precision: str, compile_: bool) -> dict:
    times: dict[str, list[float]] = {"raw": [], "trainer": []}
    for i in range(repeats):
        for kind in ("raw", "trainer") if i % 2 == 0 else ("trainer", "raw"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--workload", workload, "--variant", variant,
                 "--device", device, "--precision", precision] + (["--compile"] if compile_ else []),
                capture_output=True, text=True, check=True,
            )
            times[kind].append(float(out.stdout.strip().splitlines()[-1]))
    raw, trainer = statistics.median(times["raw"]), statistics.median(times["trainer"])
    # Each pair ran back to back, so its ratio cancels most of the machine's slow drift.
    ratios = sorted(t / r for t, r in zip(times["trainer"], times["raw"]))
    return {"workload": workload, "variant": variant, "raw_us": raw * 1e6, "trainer_us": trainer * 1e6,
            "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "char_lm"], action="append")  # default: all but empty
    parser.add_argument("--variant", choices=VARIANTS, action="append")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    parser.add_argument("--child", choices=("raw", "trainer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.child, args.workload[0], args.variant[0], args.device, args.precision, args.compile))
        return
    import platform

    print("# ratio: median of the per-pair ratios (trainer/raw, each pair back to back); pairs: their range")
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"1 thread, device {args.device}, {args.precision}{', compiled' if args.compile else ''}, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'workload':<9} {'variant':<9} {'raw us/step':>12} {'trainer us/step':>16} {'ratio':>7} {'pairs':>13}")
    for workload in args.workload or ["tiny", "small", "char_lm"]:
        for variant in args.variant or VARIANTS:
            r = measure(workload, variant, args.repeats, args.device, args.precision, args.compile)
            extra = ""
            if workload == "char_lm":
                tokens = (16 if args.device == "cpu" else 64) * 128
                extra = f"  tokens/s raw {tokens / r['raw_us'] * 1e6:,.0f} trainer {tokens / r['trainer_us'] * 1e6:,.0f}"
            spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
            print(f"{workload:<9} {variant:<9} {r['raw_us']:>12.1f} {r['trainer_us']:>16.1f} {r['ratio']:>7.3f} "
                  f"{spread:>13}{extra}", flush=True)
            print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
