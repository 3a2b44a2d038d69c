#!/usr/bin/env bash
# GPU checks, one script, about 10 minutes on one H100 or H200 (at most 17, its timeouts summed); prints one
# summary at the end.
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

echo "== char_lm, bf16: peak memory with and without activation checkpointing; tokens/s per compile mode"
timeout 420 python scripts/bench_memory.py --device cuda --precision bf16 --timeout 150 2>/dev/null | tee "$out/memory.txt"

echo
echo "================ summary"
cat "$out/gpu.txt" "$out/torch.txt"
tail -n 1 "$out/pytest.txt"
grep -h char_lm "$out/bench.txt" "$out/bench_compile.txt"
cat "$out/memory.txt"
