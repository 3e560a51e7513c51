#!/usr/bin/env bash
# GPU checks of the capture core (issue 11), about 3 minutes on one H100:
#   - the monitors under Lightning's FSDP strategy (CUDA only) warn once and stay idle (they are not verified there);
#   - the slow CPU-side checks: inductor-compiled models (inner net and whole LightningModule) and
#     MassiveActivations(probe="val") under 2-process DDP (gloo) equal one process.
# Logs go to "$OUT" if set, else ./gpu_out.
set -uo pipefail
out="${OUT:-./gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LIGHTNING_ACT_SLOW=1 OMP_NUM_THREADS=4
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
} > "$out/capture_env.txt" 2>&1
timeout 540 python -m pytest -q -rs tests/test_capture_fsdp.py tests/test_capture_compile.py tests/test_capture_probe.py \
  2>&1 | tee "$out/capture_checks.txt"
exit "${PIPESTATUS[0]}"
