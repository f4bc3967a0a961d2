#!/usr/bin/env bash
# Every CUDA check of issue 16 in one run (< 5 minutes on one GPU): resume bit-identity on CUDA,
# CPU<->CUDA checkpoint portability, no host sync inside a visit (set_sync_debug_mode("error")) and
# one per node visit, fused AdamW on the device, a profiler
# trace with CUDA kernels under the generator_step ranges, and the device benchmark (unified and
# per_class with 10/100/500 keys, vs the CPU and vs the measured GEMM rate).
#   scripts/gpu_check.sh [OUT_DIR]      (default reports/gpu_check)
#   FEDA2V_CUDA_TEST_DEVICE=cpu scripts/gpu_check.sh [OUT_DIR]   dry run of the same on the CPU
#   (every code path that is not CUDA-specific; the CUDA-only assertions are skipped, the bench is quick)
# Writes OUT_DIR/results.json, bench_device.{md,json,png} and profile/<run>/ (trace + summary.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/gpu_check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
rm -f "$OUT/results.json"
# cuBLAS reads its workspace setting when its first handle is created: set it before anything runs.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export FEDA2V_GPU_REPORT=$OUT
if [ "${FEDA2V_CUDA_TEST_DEVICE:-cuda}" = cpu ]; then
  echo "gpu_check: dry run on the CPU (FEDA2V_CUDA_TEST_DEVICE=cpu): CUDA-only assertions are skipped"
else
  "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('gpu_check:', torch.__version__, \
torch.cuda.get_device_name(0) if ok else 'no CUDA device'); sys.exit(0 if ok else 3)" \
    || { echo "gpu_check: no usable CUDA device here; nothing to check (the cuda tests are deselected)" >&2; exit 3; }
fi
status=0
timeout 280 "$PY" -m pytest -q -rs -m cuda tests/test_cuda.py -p no:cacheprovider || status=$?
echo "--- $OUT/results.json"; cat "$OUT/results.json" 2>/dev/null || true
echo "--- $OUT/bench_device.md"; cat "$OUT/bench_device.md" 2>/dev/null || true
echo "gpu_check: done in ${SECONDS}s (exit $status)"
exit $status
