#!/usr/bin/env bash
# One-command GPU check of the fused monitor statistics (issue 17), at most ~8 minutes in all
# (a global deadline of $BUDGET seconds, default 450, caps every step; later steps are skipped when it is spent):
#   1. the fused pass (eager fallback and Triton kernel) against float64 on fresh random inputs
#      (several shapes and dtypes, NaN/inf, odd sizes), plus the CUDA tests of tests/test_fused_stats.py, of
#      the Triton eigensolver (tests/test_triton_eigen.py, against numpy float64), of the statistics' host
#      transfer without a host sync (tests/test_monitor_core.py), of DimensionalCollapse against numpy, with
#      and without overlap_spectra (tests/test_collapse.py), and of SensitiveNeurons' tracking pass replayed from
#      a CUDA graph against the eager one (tests/test_graphed_pass.py) and of its one host read per checkpoint
#      (tests/test_sensitive.py);
#   2. the per-tapped-tensor benchmark (copy vs current vs fused eager / Triton);
#   2b. the Triton launch-configuration sweep (each configuration checked, then timed);
#   2k. (STEPS="... 2k") the fused pass's wall time per call beside each kernel's device time (a profile), which
#      tells the host's share from each kernel's;
#   2e. (STEPS="... 2e") DimensionalCollapse's eigensolvers on the device (cuSOLVER per matrix and batched, the
#      Triton eigensolver, and "auto", whose row names its choice) for 1 and 13 matrices of width 384, 768 and
#      1536, with the erank and PR error of each against float64: it checks "auto"'s cost model (its timings are
#      round 11's of these rows: one matrix goes to cuSOLVER at every width, 13 to Triton at width 384 only);
#   3a, 3b. the training-step overhead of the monitors (scripts/bench_monitor_overhead.py: ViT-S/16 batch 128
#      bf16-mixed, no monitors / all four at the default interval / all four every step / each alone every
#      step; then the same three first configurations with kat_small_patch16_224). It prints its ratio table
#      after every round, so a time-out still leaves the finished rounds' ratios in the log;
#   3d. a diagnosis of the every-step configuration (host syncs inside lightning_act, a 3-step profile, the
#      operations each hook dispatches), run before the step measurements;
#   3c. (STEPS="... 3c") the same overhead from (due, bare) step pairs within each fit (--alternate), which a
#      drifting host does not blur: SensitiveNeurons alone and all four, each with and without cuda_graph=True
#      (the A/B of round 12's graphed tracking pass), SensitiveNeurons' floor (a bare forward of its tracking set),
#      MassiveActivations and DimensionalCollapse alone (ActivationSparsity alone was measured in round 12;
#      PAIRS_ONLY overrides the --only list; PAIRS_ONLY="" runs every row of --per-monitor, ~10 fits); 3k
#      (STEPS="... 3k") all four with and without cuda_graph=True and all but SensitiveNeurons with
#      kat_small_patch16_224 (KAT_ONLY overrides the list; KAT_ONLY="" runs every row, each alone too).
# Steps run in this order: 1a 1b 2 2k 2e 2b 3d 3c 3k 3a 3b.
# Each step is time-boxed; a failing step prints its error and the next one still runs.
# Logs go to "$OUT" when set, else ./gpu_out. Run from the repository root:
#   bash scripts/gpu_check_monitors.sh            (PYTHON=python3 to pick the interpreter)
set -u
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-./gpu_out}"
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step cut by its time limit keeps what it printed (timeout's SIGTERM flushes nothing)
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

# STEPS picks the steps to run (default: 1a 1b 2 3d 3a 3b; 2k, 2e, 3c, 3k and 2b on request, as gpu_check_all.sh asks),
# e.g. STEPS="1a 2 3d" for a quick diagnosis.
STEPS="${STEPS:-1a 1b 2 3d 3a 3b}"  # 2b (the launch-configuration sweep) on request
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

wants 1a && run_step 1a_check_fused 40 "$PYTHON" scripts/bench_stat_kernels.py --check-only --no-compiled
wants 1b && run_step 1b_cuda_test 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fused_stats.py tests/test_triton_eigen.py tests/test_monitor_core.py tests/test_collapse.py tests/test_graphed_pass.py tests/test_sensitive.py tests/test_devices_r26.py tests/test_compat_r27.py tests/test_weights_r28.py -k "cuda or CUDA or replayed or captured"
wants 2 && run_step 2_bench_stat_kernels 40 "$PYTHON" scripts/bench_stat_kernels.py --rounds 3 --iters 10 --no-compiled
wants 2k && run_step 2k_profile_stat_kernels 40 "$PYTHON" scripts/bench_stat_kernels.py --kernels --iters 10
wants 2e && run_step 2e_bench_eigensolvers 60 "$PYTHON" scripts/bench_stat_kernels.py --eigh --eigh-device-only --eigh-widths 384,768,1536 --eigh-counts 1,13 --rounds 3
wants 2b && run_step 2b_sweep_triton_configs 60 "$PYTHON" scripts/bench_stat_kernels.py --sweep --rounds 3 --iters 10 --no-compiled
# Host syncs inside lightning_act, a 3-step profile of all four monitors every step and the operations each hook
# dispatches (first of the step measurements: round 6's budget ran out before it).
wants 3d && run_step 3d_diagnose_every_step 90 "$PYTHON" scripts/bench_monitor_overhead.py --diagnose --rounds 0 --warmup 3 --steps 8
PAIRS_ONLY="${PAIRS_ONLY-SensitiveNeurons alone;SensitiveNeurons alone, CUDA graph;all four;all four, CUDA graph;tracking forward (floor);MassiveActivations alone;DimensionalCollapse alone}"
wants 3c && run_step 3c_bench_monitor_overhead_pairs 120 "$PYTHON" scripts/bench_monitor_overhead.py --alternate --per-monitor ${PAIRS_ONLY:+--only "$PAIRS_ONLY"} --pairs 8 --rounds 1 --warmup 3
KAT_ONLY="${KAT_ONLY-all four;all four, CUDA graph;all but SensitiveNeurons}"
wants 3k && run_step 3k_bench_monitor_overhead_pairs_kat 150 "$PYTHON" scripts/bench_monitor_overhead.py --model kat_small_patch16_224 --alternate --per-monitor ${KAT_ONLY:+--only "$KAT_ONLY"} --pairs 8 --rounds 1 --warmup 3
# 2 + 20 timed steps per fit (the default interval's due step then falls outside the window: its ratio is the
# hooks' cost when not due; --steps 50 times one due step).
wants 3a && run_step 3a_bench_monitor_overhead_vit "${VIT_LIMIT:-150}" "$PYTHON" scripts/bench_monitor_overhead.py ${PER_MONITOR---per-monitor} --rounds 2 --warmup 2 --steps 20
wants 3b && run_step 3b_bench_monitor_overhead_kat 90 "$PYTHON" scripts/bench_monitor_overhead.py --model kat_small_patch16_224 --rounds 2 --warmup 2 --steps 20

echo "logs in $LOG_DIR; overall status $STATUS; ${SECONDS}s"
exit "$STATUS"
