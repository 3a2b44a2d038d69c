"""Peak memory with and without activation checkpointing, and throughput per compile mode, for the
char_lm transformer trained by the Trainer.

Each variant runs in a fresh process (its own CUDA memory statistics and compile caches) and prints
one JSON line; the parent prints one summary line for checkpointing and one per compile mode. On CUDA the peak is
``torch.cuda.max_memory_allocated``; on CPU, where there is none, the bytes saved for backward
(``trainer.memory.SavedForBackward``) stand in. Throughput is the Trainer's ``samples_per_sec``
times the block size over the second half of the steps (warmed up, compiled). Nothing is asserted.

    python scripts/bench_memory.py --device cuda                       # both parts, H100/H200 sizes
    python scripts/bench_memory.py --device cpu --quick --backend aot_eager --modes off default
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
SIZES = {  # (block_size, d_model, n_layers, n_heads, batch, steps)
    "full": (512, 512, 8, 8, 32, 40),
    "quick": (32, 32, 2, 2, 4, 4),
}


def child(device: str, precision: str, size: str, checkpointing: bool, mode: str, backend: str) -> dict:
    import torch

    from trainer import Trainer
    from trainer.examples.char_lm import CharTransformer, lm_loss, load
    from trainer.memory import SavedForBackward

    block, width, layers, heads, batch, steps = SIZES[size]
    data = load(block_size=block, max_bytes=max(200_000, 2 * batch * steps * (block + 1)))["train"]
    if mode == "off":
        compiled: bool | dict = False
    else:
        compiled = {"mode": mode, "backend": backend} if mode != "default" else {"backend": backend}

    def model():
        return CharTransformer(block_size=block, d_model=width, n_layers=layers, n_heads=heads, dropout=0.0)

    trainer = Trainer(model, lambda p: torch.optim.AdamW(p, lr=3e-4, fused=device != "cpu"), data, loss_fn=lm_loss,
                      config={"device": device, "precision": precision, "batch_size": batch, "max_steps": steps,
                              "log_every_n_steps": steps // 2, "eval_every_n_epochs": None, "progress": "off",
                              "sanity_check": False, "compile": compiled,
                              "activation_checkpointing": ["Block"] if checkpointing else []})
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    started = time.perf_counter()
    trainer.fit()
    record = trainer.history[-1]  # the second half of the steps: warmed up, compiled or not
    # What one step keeps for backward (eager forward, the same checkpointing), outside the timed run.
    x = data.tensors[0][:batch].to(trainer.device)
    with trainer.precision.autocast, SavedForBackward(trainer.module) as saved:
        out = trainer.module(x)
    del out
    return {
        "checkpointing": checkpointing, "mode": mode, "backend": backend,
        "tokens_per_s": record["samples_per_sec"] * block,
        "first_step_s": trainer.history[0].get("time/first_step_s"),
        "recompiles": record.get("compile/recompiles"),
        "peak_gb": record.get("cuda_peak_mem_gb"),
        "saved_gb": saved.bytes / 2**30,
        "wall_s": time.perf_counter() - started,
    }


def run_child(args: argparse.Namespace, checkpointing: bool, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--device", args.device, "--precision", args.precision,
           "--backend", args.backend, "--mode", mode] + (["--quick"] if args.quick else []) + \
          (["--checkpointing"] if checkpointing else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "checkpointing": checkpointing, "error": f"over {args.timeout} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"mode": mode, "checkpointing": checkpointing, "error": last[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--quick", action="store_true", help="a tiny model and 4 steps (checks the script runs)")
    parser.add_argument("--part", choices=("memory", "compile", "both"), default="both")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:4]))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per variant")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    if args.child:
        print(json.dumps(child(args.device, args.precision, size, args.checkpointing, args.mode, args.backend)))
        return

    block, width, layers, heads, batch, _ = SIZES[size]
    what = f"char_lm {layers}x{width}, batch {batch}x{block}, {args.precision}, {args.device}"
    if args.part in ("memory", "both"):
        off, on = run_child(args, False, "off"), run_child(args, True, "off")
        for r in (off, on):
            print(json.dumps(r), file=sys.stderr)
        if "error" in off or "error" in on:
            print(f"activation checkpointing, {what}: failed: {off.get('error') or on.get('error')}")
        else:
            peak = (f"peak {off['peak_gb']:.2f} -> {on['peak_gb']:.2f} GB, " if off["peak_gb"] is not None else "")
            print(f"activation checkpointing, {what}: {peak}saved for backward {off['saved_gb'] * 1024:.1f} -> "
                  f"{on['saved_gb'] * 1024:.1f} MiB, {off['tokens_per_s']:,.0f} -> {on['tokens_per_s']:,.0f} tokens/s",
                  flush=True)
    if args.part in ("compile", "both"):
        backend = f", backend {args.backend}" if args.backend != "inductor" else ""
        for mode in args.modes:  # a line each, so that a time limit cuts only the modes after it
            r = run_child(args, False, mode)
            print(json.dumps(r), file=sys.stderr)
            if "error" in r:
                print(f"compile {mode}, {what}{backend}: failed ({r['error']})", flush=True)
                continue
            first = f", first step {r['first_step_s']:.0f} s, recompiles {r['recompiles']}" if mode != "off" else ""
            peak = f", peak {r['peak_gb']:.2f} GB" if r["peak_gb"] is not None else ""
            print(f"compile {mode}, {what}{backend}: {r['tokens_per_s']:,.0f} tokens/s{first}{peak}", flush=True)


if __name__ == "__main__":
    main()
