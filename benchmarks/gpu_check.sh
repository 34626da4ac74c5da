#!/usr/bin/env bash
# The device check of issue 15, as one prepared script (about 6-8 minutes on one H100/H200).
# It writes every table to $OUT (default benchmarks/results/gpu) with the device, torch version and date.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine
#   bash benchmarks/gpu_check.sh --device cpu --quick   # the same script, tried on a CPU first
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "unknown argument: $1 (valid: --device cpu|cuda, --quick)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# device check $(date -u '+%Y-%m-%d %H:%M UTC')"
  "$PY" -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [ -n "$QUICK" ]; then
  ROUNDS=(--rounds 1 --steps 40); OVER=(--repeats 1 --budget-repeats 1 --steps 30 --workloads mlp); MODELS=(mlp gpt)
else
  # 4 rounds: with the counted fits (tensor operations, no clock) step_cost.py stays well inside its 300 s
  ROUNDS=(--rounds 4 --steps 100); OVER=(--repeats 3 --budget-repeats 5 --steps 100); MODELS=(mlp gpt gpt-medium)
fi
[ "$DEVICE" = cpu ] && MODELS=(mlp gpt)

# 1. zero host syncs off logging steps (torch.cuda.set_sync_debug_mode("error")); skipped on a CPU
"$PY" -m pytest -q -p no:cacheprovider tests/integration/test_no_sync.py > "$OUT/no_sync.txt" 2>&1
echo "no-sync tests: $(tail -1 "$OUT/no_sync.txt")"
# 2. per-step cost: plain, sampled and logging steps over bare Lightning (lock-step pairs), inside the
#    callbacks (the direct clock) and in tensor operations (on a GPU, mostly launches), the GPU-sized GPT
#    included; an empty callback is Lightning's dispatch floor
timeout 300 "$PY" benchmarks/step_cost.py --device "$DEVICE" --models "${MODELS[@]}" --configs "Watch()" "empty callback" \
  "${ROUNDS[@]}" --out "$OUT/step_cost.json" > "$OUT/step_cost.md" 2> "$OUT/step_cost.log"
echo "step cost: rc=$?"; cat "$OUT/step_cost.md"
# 3. the four workloads of the overhead benchmark, default Watch(): step and whole-run ratios, direct cost, peak memory
timeout 240 "$PY" benchmarks/overhead.py --device "$DEVICE" --configs bare watch --no-every-step "${OVER[@]}" \
  --markdown > "$OUT/overhead.md" 2> "$OUT/overhead.log"
echo "overhead: rc=$?"; cat "$OUT/overhead.md"
