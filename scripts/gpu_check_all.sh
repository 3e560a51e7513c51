#!/usr/bin/env bash
# Every GPU check this project owes, in one command sized for one device call (at most ~9.7 minutes in all;
# give the device call timeout_s=595):
#   1. scripts/gpu_check_monitors.sh (issue 17): the fused statistics against float64 and the CUDA tests (round
#      17's: the Triton eigensolver solving narrow matrices many times, which a race between warps made wrong
#      intermittently, and a failed CUDA-graph capture leaving the random generator usable), the fused pass's
#      timings (step 2: round 17 sums x and x² in float64 per lane; step 2k: each kernel's device time beside the
#      pass's wall time) and the eigensolvers' (step 2e: round 17's
#      barrier may move auto_eigensolver's crossover), then the paired-step
#      overhead with ViT-S (SensitiveNeurons alone and all four, each with and without cuda_graph=True;
#      SensitiveNeurons' floor; MassiveActivations and DimensionalCollapse alone) and with KAT-S (all four with
#      and without cuda_graph=True, all but SensitiveNeurons); the diagnosis of the every-step step (host syncs,
#      profile, operations per hook; step 3d, measured in round 12) on request, e.g. MONITOR_STEPS="1a 1b 3d 3c";
#   2. scripts/gpu_check_kat.sh --quick (issue 13): the GR-KAN kernels against float64, then the activation,
#      eager / compiled / reduce-overhead step, host-time and MLP-block tables.
# Each part keeps its own time-boxed steps and its logs ($OUT/monitors, $OUT/kat; ./gpu_out without $OUT).
# MONITORS_BUDGET and KAT_BUDGET (seconds, default 340 and 240) split the time; PYTHON picks the interpreter.
#   PYTHON=python3 bash scripts/gpu_check_all.sh
set -u
cd "$(dirname "$0")/.."
ROOT="${OUT:-./gpu_out}"
STATUS=0
OUT="$ROOT/monitors" BUDGET="${MONITORS_BUDGET:-340}" STEPS="${MONITOR_STEPS:-1a 1b 2 2k 2e 3c 3k}" \
  bash scripts/gpu_check_monitors.sh || STATUS=1
OUT="$ROOT/kat" GPU_CHECK_BUDGET="${KAT_BUDGET:-240}" bash scripts/gpu_check_kat.sh --quick || STATUS=1
if [ -n "${OUT:-}" ]; then  # the device tool returns at most 8 files from $OUT: the logs travel as one archive
  tar czf "$ROOT/logs.tgz" -C "$ROOT" monitors kat && rm -rf "$ROOT/monitors" "$ROOT/kat"
fi
echo "gpu_check_all: logs in $ROOT$([ -n "${OUT:-}" ] && echo /logs.tgz); overall status $STATUS"
exit "$STATUS"
