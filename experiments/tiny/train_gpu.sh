#!/usr/bin/env bash
# Train the tiny model on one lent GPU: four configurations side by side (a tiny model leaves
# most of the card idle), each keeping its best checkpoint on the validation split, while
# the CUDA tests run beside them. Each run comes back as a tar (checkpoint, training log,
# stdout) split into 15 MB parts under $OUT (cat A.tar.part* > A.tar), since at most 16 MiB
# per file returns from a lent machine.
#
#   OUT=/tmp/tiny_gpu MINUTES=6.3 bash experiments/tiny/train_gpu.sh
#
# Run A of 2026-11-27 (H200, 6.4 min, suite v1) is stage 1 of the shipped checkpoint; see
# experiments/tiny/README.md. Pick a run by its validation exact match (training_log.json
# "selected"), unpack it, and run experiments/tiny/evaluate.py --model DIR on the CPU.
# A CPU smoke test of this script: DEVICE=cpu POOL=2048 MINUTES=0.05 EXTRA="--no-compile
# --eval-n 10 --eval-batch 10 --workers 1 --batch 16 --eval-every 5" (without .whl/).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/tiny_gpu}
MINUTES=${MINUTES:-6.3}
DEVICE=${DEVICE:-cuda}
POOL=${POOL:-3000000}
EXTRA=${EXTRA:-} # more train.py options for every run (e.g. a CPU smoke test)
RUNS=/tmp/tiny_runs
mkdir -p "$OUT" "$RUNS"
# shellcheck source=experiments/gpu/device_env.sh
source experiments/gpu/device_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, pydantic; print('torch', torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/summary.txt"

(timeout 240 python3 -m pytest -q -p no:cacheprovider -m requires_cuda tests \
  >"$OUT/pytest_cuda.log" 2>&1; echo "pytest rc=$?" >>"$OUT/pytest_cuda.log") &

LIMIT=$(python3 -c "print(int($MINUTES * 60 + 100))")
train() {
  local name=$1
  shift
  # shellcheck disable=SC2086
  timeout "$LIMIT" python3 experiments/tiny/train.py --device "$DEVICE" --threads 2 \
    --batch 512 --pool "$POOL" --workers 4 --warmup 300 --steps 1000000 --time-schedule \
    --max-minutes "$MINUTES" --eval-every 1000 --eval-n 1000 --eval-batch 500 \
    --out "$RUNS/$name" --run-dir "$RUNS/$name.last" "$@" $EXTRA >"$RUNS/$name.log" 2>&1
  echo "$name rc=$?" >>"$RUNS/$name.log"
}
train A --d-model 192 --n-layers 6 --n-heads 6 --mlp 512 --lr 1.5e-3 &
train B --d-model 256 --n-layers 6 --n-heads 8 --mlp 640 --lr 1e-3 &
train C --d-model 128 --n-layers 8 --n-heads 4 --mlp 384 --lr 2e-3 &
train D --init dlm_decode/assets/tiny --lr 1e-3 &
wait

for name in A B C D; do
  dir=$RUNS/$name
  [ -f "$dir/model.safetensors" ] || dir=$RUNS/$name.last # killed: the last evaluated one
  tr '\r' '\n' <"$RUNS/$name.log" | grep -v '^train: ' >"$dir/stdout.log"
  tar -C "$dir" -cf "$RUNS/$name.tar" . && grep -h "validation exact match\|saved\|rc=" \
    "$dir/stdout.log" | sed "s/^/$name: /" | tee -a "$OUT/summary.txt"
  # at most 16 MiB per file comes back from a lent machine: split the larger ones
  split -b 15M -d "$RUNS/$name.tar" "$OUT/$name.tar.part"
done
tail -3 "$OUT/pytest_cuda.log"
ls -la "$OUT"
