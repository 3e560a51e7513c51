#!/usr/bin/env bash
# One command for the GPU side of issue 13 (KAT at ViT speed): correctness of the GR-KAN Triton kernels
# against float64 on fresh random inputs, the CUDA tests, then every benchmark table of the issue.
#
#   bash scripts/gpu_check_kat.sh            # about 8 minutes at most
#   bash scripts/gpu_check_kat.sh --quick    # 150 s at most (GPU_CHECK_BUDGET=200 for 200 s): correctness of the
#                                            # default and the candidate KernelConfigs (40 s), then in ONE process
#                                            # (one start-up) activation (bf16 kernel time, default vs the previous
#                                            # config), eager step, host, MLP block, then the
#                                            # compiled step last, the longest (default mode with a profiled step: are
#                                            # the Triton kernels launched by Inductor's code, then reduce-overhead;
#                                            # run 5 lost the MLP block after it); then, with time left, the
#                                            # Inductor code check; no pytest, no sweep
#
# Every step runs under its own time limit, capped by what is left of the total budget; a failure or
# timeout is printed (with the end of its log) and the next step runs; the exit status is 1 if any step failed or
# timed out (a step skipped for lack of time is not a failure: the quick mode's last step runs only with time left).
# Logs go to "$OUT" if set, else ./gpu_out: one log per step plus summary.md (all tables in one file).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step cut by its time limit keeps what it printed
OUT_DIR="${OUT:-./gpu_out}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
PYTHON="${PYTHON:-python}"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
START=$(date +%s)
# seconds for all steps together: 150 (--quick) / 450; GPU_CHECK_BUDGET overrides
BUDGET=${GPU_CHECK_BUDGET:-$([ $QUICK = 1 ] && echo 150 || echo 450)}
STATUS=0

# step NAME SECONDS COMMAND...: run with a limit capped by the time left; output to a log and the summary
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "## $name: SKIPPED (no time left in the ${BUDGET}s budget)" | tee -a "$SUMMARY"
    return
  fi
  echo "## $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  grep -v '^\s*$' "$OUT_DIR/$name.log" | grep -E '^(\||#|PASS|FAIL|<!--|device|Triton|[0-9]+ (passed|failed)|=+ .*(passed|failed|error))' >> "$SUMMARY"
  local status="ok"
  [ $rc = 124 ] || [ $rc = 137 ] && status="TIMED OUT after ${limit}s"
  [ $rc != 0 ] && [ "$status" = ok ] && status="FAILED (exit $rc; see $name.log)"
  echo "-- $name: $status in $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
  if [ "$status" != ok ]; then
    tail -n 25 "$OUT_DIR/$name.log"
    STATUS=1
  fi
}

: > "$SUMMARY"
{
  echo "# gpu_check_kat $([ $QUICK = 1 ] && echo --quick) $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/# /'
  timeout 30 $PYTHON -c "import importlib.metadata as m, torch; print('# torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', m.version('triton'), 'timm', m.version('timm'))" 2>&1
} | tee -a "$SUMMARY"

# the round-2 default, for the A/B against today's default (the best configuration of H100 run 3; KernelConfig
# fields: block_k, forward_tile, backward_tile, backward_row_tiles, num_warps, interleave_groups,
# backward_prefetch); the correctness step checks the same one (CANDIDATE_CONFIGS in check_rational_cuda.py)
CANDIDATES="0,4096,1024,8,4,0,0"

if [ $QUICK = 1 ]; then
  step correctness 40 $PYTHON scripts/check_rational_cuda.py --quick
  # one process for every benchmark (one start-up and CUDA init); sections print as they finish, so the time
  # limit can only cut the last ones
  # (runs 5 and 6 profiled the host call and timed the candidate configuration; run 6's quick bench was cut before
  # reduce-overhead, so the quick mode leaves both to the full mode)
  step bench 190 $PYTHON scripts/bench_rational.py --sections activation,step,host,mlp,step_compiled --dtypes bf16 --rounds 6 --inner 4 --no-compile
  # PyTorch could not tell which arguments a Triton kernel writes: Inductor then copies every input before it
  copies=$(grep -c 'assuming every input is mutated' "$OUT_DIR/bench.log" 2>/dev/null)
  echo "# 'assuming every input is mutated' warnings during the benchmarks: ${copies:-no log}" | tee -a "$SUMMARY"
  # with time left: Inductor's generated code for a GroupRational fwd+bwd names the three kernels, no op call
  step compiled_launches 40 $PYTHON scripts/check_rational_cuda.py --compiled-launches-only
else
  step correctness 80 $PYTHON scripts/check_rational_cuda.py
  step cuda_tests 100 $PYTHON -m pytest -q -p no:cacheprovider tests/test_group_rational.py tests/test_rational_op.py -k cuda
  step bench_host_activation 90 $PYTHON scripts/bench_rational.py --sections host,activation,sweep --rounds 15 --inner 10 --profile-host --configs $CANDIDATES
  step bench_mlp 70 $PYTHON scripts/bench_rational.py --sections mlp --rounds 15 --inner 10
  step bench_step_eager 40 $PYTHON scripts/bench_rational.py --sections step --rounds 12 --inner 4 --configs $CANDIDATES
  step bench_step_compiled 120 $PYTHON scripts/bench_rational.py --sections step_compiled --rounds 10 --inner 4
fi
echo "# total $(( $(date +%s) - START ))s; logs in $OUT_DIR; overall status $STATUS" | tee -a "$SUMMARY"
exit "$STATUS"
