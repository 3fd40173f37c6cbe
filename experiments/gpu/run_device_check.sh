#!/usr/bin/env bash
# The one GPU check of the fast path: CUDA tests, then the LLaDA-8B-shaped bench (random
# weights, bf16, prompt 768, gen 256, block 32). Runs from the repository root on a lent GPU
# machine in about 6 minutes (at most 8.7); see experiments/gpu/README.md for how to launch it.
#
# Each phase has its own timeout so that one slow phase cannot eat the others, and every
# bench writes its JSON after each row, so partial results come back under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/dlm_decode_gpu}
mkdir -p "$OUT"
# shellcheck source=experiments/gpu/device_env.sh
source experiments/gpu/device_env.sh

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, pydantic, pluggy; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'pydantic', pydantic.VERSION)"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. pytest -m requires_cuda"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m requires_cuda tests 2>&1 \
  | tee "$OUT/pytest.log"
echo "pytest rc=${PIPESTATUS[0]}" | tee -a "$OUT/pytest.log"

BENCH=(python3 -m dlm_decode bench --arch llada-8b --random-weights
       --prompt-length 768 --gen-length 256 --block-length 32 --policies frechet)

echo "== 2. dual and prefix, B=1,8, fast vs reference"
timeout 190 "${BENCH[@]}" --caches dual,prefix --batch-sizes 1,8 --warmup 2 --repeats 1 \
  --compare --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

echo "== 3. none, B=1, fast vs reference"
timeout 90 "${BENCH[@]}" --caches none --batch-sizes 1 --warmup 2 --repeats 1 \
  --compare --json "$OUT/bench_none.json" 2>&1 | tee -a "$OUT/bench.log"

# No warm-up here: each block's first step runs eagerly and its second is captured, so
# these ms/NFE include 2 of every 32 steps unreplayed (a slight overestimate).
echo "== 4. dual at B=32 (goal <= 38 ms/NFE) and B=64 (must fit), fast path only"
timeout 120 "${BENCH[@]}" --caches dual --batch-sizes 32,64 --warmup 0 --repeats 1 \
  --no-profile --json "$OUT/bench_big.json" 2>&1 | tee -a "$OUT/bench.log"

echo "== done; results in $OUT"
ls -la "$OUT"
