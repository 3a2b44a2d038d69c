#!/usr/bin/env bash
# GPU checks, one script, under 5 minutes on one H100 or H200; prints one summary at the end.
#
# Needs: torch with CUDA, pydantic (v2), typer, tqdm, pyyaml, pytest; run from the repository root:
#     bash scripts/gpu_check.sh
# Results go to the README's performance section, with the card they ran on.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=$(mktemp -d)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$out/torch.txt"

echo "== pytest -m cuda (includes the sync-debug check)"
timeout 240 python -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tee "$out/pytest.txt"

echo "== char_lm, bf16, Trainer vs raw loop"
timeout 150 python scripts/bench_overhead.py --device cuda --precision bf16 --workload char_lm --variant logging \
  --repeats 3 2>/dev/null | tee "$out/bench.txt"
echo "== char_lm, bf16, compiled"
timeout 200 python scripts/bench_overhead.py --device cuda --precision bf16 --compile --workload char_lm \
  --variant logging --repeats 2 2>/dev/null | tee "$out/bench_compile.txt"
# The loop's stall per checkpoint, synchronous vs checkpoint.async (a copy into pinned memory), 1 GiB of
# weights + AdamW (3 GiB checkpoints). Here in reduced CPU form: --device cpu --mb 20 --runs 2 --saves 2
echo "== checkpoint stall, sync vs async"
timeout 150 python scripts/bench_checkpoint.py --stall --device cuda --mb 1024 --runs 2 --saves 2 2>/dev/null \
  | tee "$out/ckpt_stall.txt"

echo
echo "================ summary"
cat "$out/gpu.txt" "$out/torch.txt"
tail -n 1 "$out/pytest.txt"
grep -h char_lm "$out/bench.txt" "$out/bench_compile.txt"
grep -h "stall per save\|first save\|MiB of weights" "$out/ckpt_stall.txt"
