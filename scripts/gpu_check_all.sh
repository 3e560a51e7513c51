#!/usr/bin/env bash
# Every GPU check this project owes, in one command sized for one device call (about 9 minutes in all):
#   1. scripts/gpu_check_monitors.sh (issue 17): the fused statistics against float64 and the CUDA test, the
#      eigensolver candidates, the paired-step overhead with ViT-S and with KAT-S (all four, all but
#      SensitiveNeurons, each alone, SensitiveNeurons' floor), the interleaved fits (which give the default
#      interval's row), then, with time left, the diagnosis of the every-step step;
#   2. scripts/gpu_check_kat.sh --quick (issue 13): the GR-KAN kernels against float64, then the activation,
#      eager / compiled / reduce-overhead step, host-time and MLP-block tables.
# Each part keeps its own time-boxed steps and its logs ($OUT/monitors, $OUT/kat; ./gpu_out without $OUT).
# MONITORS_BUDGET and KAT_BUDGET (seconds, default 330 and 220) split the time; PYTHON picks the interpreter.
#   PYTHON=python3 bash scripts/gpu_check_all.sh
set -u
cd "$(dirname "$0")/.."
ROOT="${OUT:-./gpu_out}"
STATUS=0
OUT="$ROOT/monitors" BUDGET="${MONITORS_BUDGET:-330}" STEPS="${MONITOR_STEPS:-1a 1b 2e 3c 3k 3a 3d}" \
  bash scripts/gpu_check_monitors.sh || STATUS=1
OUT="$ROOT/kat" GPU_CHECK_BUDGET="${KAT_BUDGET:-220}" bash scripts/gpu_check_kat.sh --quick || STATUS=1
echo "gpu_check_all: logs in $ROOT; overall status $STATUS"
exit "$STATUS"
