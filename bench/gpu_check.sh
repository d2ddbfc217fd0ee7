#!/usr/bin/env bash
# The one prepared device check for fp8/ (GitHub issue 5): GPU tests first, then bench/fp8_gemm.py
# (correctness, then FP8 GEMM TFLOP/s next to bf16, quantizer GB/s next to a copy, a table last).
# Budget: under 8 minutes on one H200 (the two timeouts add up to 7.7; a normal run takes ~4).
#   bash bench/gpu_check.sh            # from anywhere; logs and JSON go to $OUT (default /tmp/fp8_gpu_check)
# Uses the machine's python3 (PYTHON=... to override): it needs torch with CUDA, triton and pytest; no
# other moeforge dependency is imported (the fp8 package stands alone).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fp8_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
$PY - <<'PY'
import torch
import importlib.util
tv = __import__("triton").__version__ if importlib.util.find_spec("triton") else "none"
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {tv} "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
from fp8 import unavailable_reason
for b in ("emulate", "triton", "cublas"):
    print(f"backend {b}: {unavailable_reason(b) or 'available'}")
PY

echo "== tests/gpu/test_fp8_gpu.py =="
timeout -s KILL 200 $PY -m pytest tests/gpu/test_fp8_gpu.py -q -rs --noconftest -p no:cacheprovider 2>&1 \
    | tee "$OUT/fp8_gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== bench/fp8_gemm.py =="
timeout -s KILL 260 $PY bench/fp8_gemm.py --json "$OUT/fp8_bench.json" 2>&1 | tee "$OUT/fp8_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc (logs in $OUT)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
