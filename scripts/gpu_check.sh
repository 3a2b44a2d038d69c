#!/usr/bin/env bash
# GPU checks, one script, at most 9 minutes on one H100 or H200 (its timeouts summed: 540 s, so that one
# device call of 10 minutes holds it); prints one summary at the end. SECTIONS picks a part of it:
#     SECTIONS="pytest overhead compile async memory precision" (the default: all of them)
#     SECTIONS=observability   (not in the default: the time shares and a profiler trace of char_lm, 40 s)
#
# Needs: torch with CUDA, pydantic (v2), typer, tqdm, pyyaml, pytest; run from the repository root:
#     bash scripts/gpu_check.sh
# Results go to docs/performance.md, with the card they ran on.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=$(mktemp -d)
sections=" ${SECTIONS:-pytest overhead compile async memory precision} "
want() { [[ "$sections" == *" $1 "* ]]; }
touch "$out/pytest.txt" "$out/bench.txt" "$out/bench_compile.txt" "$out/ckpt_stall.txt" "$out/memory.txt" "$out/precision.txt" \
  "$out/observability.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$out/torch.txt"

# Includes the sync-debug check, time/gpu_busy from CUDA events (tests/observability/test_timing.py) and the memory
# snapshot of a real out-of-memory error with a trace of CUDA kernels (tests/observability/test_profiling.py).
echo "== pytest -m cuda (includes the sync-debug check, time/gpu_busy, the memory snapshot on OOM)"
# Serially (-o addopts= drops pyproject's -n auto): the tests share one GPU, and one of them fills its memory.
want pytest && timeout 150 python -m pytest -o addopts= -q -m cuda tests/ -p no:cacheprovider 2>&1 | tee "$out/pytest.txt"

echo "== char_lm, bf16, Trainer vs raw loop"
want overhead && timeout 70 python scripts/bench_overhead.py --device cuda --precision bf16 --workload char_lm --variant logging \
  --repeats 2 2>/dev/null | tee "$out/bench.txt"
echo "== char_lm, bf16, compiled"
want compile && timeout 90 python scripts/bench_overhead.py --device cuda --precision bf16 --compile --workload char_lm \
  --variant logging --repeats 2 2>/dev/null | tee "$out/bench_compile.txt"
# The loop's stall per checkpoint, synchronous vs checkpoint.async (a copy into pinned memory), 1 GiB of
# weights + AdamW (1.5 GiB checkpoints). Here in reduced CPU form: --device cpu --mb 20 --runs 2 --saves 2
echo "== checkpoint stall, sync vs async"
want async && timeout 40 python scripts/bench_checkpoint.py --stall --device cuda --mb 512 --runs 1 --saves 2 2>/dev/null \
  | tee "$out/ckpt_stall.txt"

echo "== char_lm, bf16: peak memory with and without activation checkpointing; tokens/s per compile mode"
want memory && timeout 120 python scripts/bench_memory.py --device cuda --precision bf16 --timeout 40 \
  --modes off default reduce-overhead 2>/dev/null | tee "$out/memory.txt"

# bf16 keeps fp32 weights, gradients and AdamW state (16 bytes a parameter); bf16-true holds them in
# bf16 (8). A model large enough for that to show: 12 x 1024, about 150 M parameters. The runs' own
# records give the peak memory and the throughput of the last log interval (steps 51-60).
echo "== char_lm 12 x 1024 (~150 M parameters), bf16 vs bf16-true: peak memory, tokens/s"
want precision && for p in bf16 bf16-true; do
  timeout 35 python -m trainer run configs/char_lm.yaml device=cuda precision=$p batch_size=64 max_steps=60 log_every_n_steps=50 \
    scheduler.T_max=60 model.d_model=1024 model.n_layers=12 model.n_heads=16 eval_every_n_steps=null \
    checkpoint.every_n_steps=null checkpoint.save_final=false progress=off out_dir="$out/runs" name="$p" \
    >"$out/run_$p.txt" 2>&1 || { echo "char_lm 150M $p failed:"; tail -n 3 "$out/run_$p.txt"; }
  python - "$out/runs/$p/metrics.jsonl" "$p" <<'EOF' 2>/dev/null | tee -a "$out/precision.txt"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
last = [r for r in records if "samples_per_sec" in r][-1]
val = [r["val/loss"] for r in records if "val/loss" in r][-1]
print(f"char_lm 150M {sys.argv[2]:<9} peak {last.get('cuda_peak_mem_gb', float('nan')):6.2f} GiB  "
      f"tokens/s {last['samples_per_sec'] * 128:>9,.0f}  val/loss {val:.3f} after {last['step']} steps")
EOF
done

echo "== char_lm, bf16: where the step's time goes (time/*, tokens/s, MFU) and a trace of steps 20-21"
want observability && timeout 40 python -m trainer run configs/char_lm.yaml device=cuda precision=bf16 max_steps=30 \
  log_every_n_steps=10 scheduler.T_max=30 eval_every_n_steps=null checkpoint.every_n_steps=null checkpoint.save_final=false \
  progress=off out_dir="$out/runs" name=observe 'profile={start_step: 20, steps: 2, memory_snapshot_on_oom: true}' \
  >"$out/run_observe.txt" 2>&1 && python - "$out/runs/observe" <<'EOF' 2>&1 | tee "$out/observability.txt"
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
print("char_lm observability:", {k: round(v, 3) for k, v in last.items() if k.startswith("time/") or k.endswith("_per_sec")})
print("char_lm traces:", sorted(p.name for p in (run / "profile").iterdir()))
EOF

echo
echo "================ summary"
cat "$out/gpu.txt" "$out/torch.txt"
tail -n 1 "$out/pytest.txt"
grep -h char_lm "$out/bench.txt" "$out/bench_compile.txt"
cat "$out/memory.txt"
cat "$out/precision.txt"
cat "$out/observability.txt"
grep -h "stall per save\|first save\|MiB of weights" "$out/ckpt_stall.txt"
