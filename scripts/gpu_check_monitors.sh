#!/usr/bin/env bash
# One-command GPU check of the fused monitor statistics (issue 17), at most ~8 minutes in all
# (a global deadline of $BUDGET seconds, default 450, caps every step; later steps are skipped when it is spent):
#   1. the fused pass (eager fallback and Triton kernel) against float64 on fresh random inputs
#      (several shapes and dtypes, NaN/inf, odd sizes), plus the CUDA test of tests/test_fused_stats.py;
#   2. the per-tapped-tensor benchmark (copy vs current vs fused eager / Triton);
#   3. when the callbacks call the fused pass, the training-step overhead of the monitors
#      (scripts/bench_monitor_overhead.py: ViT-S/16 batch 128 bf16-mixed, no monitors / all four at the
#      default interval / all four every step / each alone every step; then the same three first
#      configurations with kat_small_patch16_224). It prints its ratio table after every round, so a
#      time-out still leaves the finished rounds' ratios in the log.
# Each step is time-boxed; a failing step prints its error and the next one still runs.
# Logs go to "$OUT" when set, else ./gpu_out. Run from the repository root:
#   bash scripts/gpu_check_monitors.sh            (PYTHON=python3 to pick the interpreter)
set -u
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-./gpu_out}"
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
BUDGET="${BUDGET:-450}"
STATUS=0

run_step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "=== $name: skipped (the ${BUDGET}s budget is spent)"
    STATUS=1
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (time limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=3 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOG_DIR/$name.log"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== $name: TIMED OUT after ${limit}s (partial log above, full log $LOG_DIR/$name.log)"
  elif [ "$rc" -ne 0 ]; then
    echo "=== $name: FAILED rc=$rc (full log $LOG_DIR/$name.log)"
  else
    echo "=== $name: ok in $((SECONDS - start))s"
  fi
  [ "$rc" -ne 0 ] && STATUS=1
  return 0
}

{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
  git rev-parse HEAD 2>/dev/null
} | tee "$LOG_DIR/0_environment.log"

run_step 1a_check_fused 25 "$PYTHON" scripts/bench_stat_kernels.py --check-only --no-compiled
run_step 1b_cuda_test 20 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_fused_stats.py -k cuda
run_step 2_bench_stat_kernels 25 "$PYTHON" scripts/bench_stat_kernels.py --rounds 3 --iters 10 --no-compiled

if grep -q "fused_statistics" lightning_act/callbacks/*.py lightning_act/capture/*.py 2>/dev/null; then
  # 2 + 50 steps per fit: the 50 timed steps hold exactly one due step of the default interval.
  run_step 3a_bench_monitor_overhead_vit 230 "$PYTHON" scripts/bench_monitor_overhead.py --per-monitor --rounds 2 --warmup 2 --steps 30
  run_step 3b_bench_monitor_overhead_kat 120 "$PYTHON" scripts/bench_monitor_overhead.py --model kat_small_patch16_224 --rounds 2 --warmup 2 --steps 30
else
  echo "=== 3_bench_monitor_overhead: skipped (the callbacks do not call fused_statistics yet)"
fi

echo "logs in $LOG_DIR; overall status $STATUS; ${SECONDS}s"
exit "$STATUS"
