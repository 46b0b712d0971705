#!/usr/bin/env bash
# The one GPU check, for a lent GPU (one H200: under 8 minutes). From the repository root:
#     bash tests/gpu/run.sh            # or: make gpu-check;   OUT=/some/dir keeps the logs and JSON
# 1. every gpu-marked test (TE spec parity bf16/FP8, DALI mixed, Triton loss kernel, NCCL sanity);
# 2. a table: MFU of the m2-1b shape (local bf16, te bf16, te FP8), DALI mixed images/s, and the loss
#    kernel's time and memory against the unfused loss (printed by tests/gpu/test_loss_kernel.py).
# Needs a CUDA torch, Transformer Engine and DALI (requirements-gpu.txt). PY picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null
    then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-$(mktemp -d -t m2-gpu-check.XXXX)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
START=$SECONDS

# Every file with gpu-marked tests (tests/unit/test_planning.py checks this list is complete).
# test_nccl.py makes its own NCCL world, so it runs in its own pytest process.
GPU_TESTS=(tests/gpu/test_te_spec.py tests/gpu/test_dali_mixed.py tests/gpu/test_loss_kernel.py
           tests/gpu/test_checkpoint_fused_adam.py)
NCCL_TESTS=(tests/gpu/test_nccl.py)

echo "== gpu-marked tests (python: $PY, out: $OUT)"
timeout 300 "$PY" -m pytest -q -s -rA -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}
timeout 60 "$PY" -m pytest -q -rA -p no:cacheprovider "${NCCL_TESTS[@]}" 2>&1 | tee "$OUT/nccl_tests.log"
rc_nccl=${PIPESTATUS[0]}

echo "== performance"
timeout 150 "$PY" tests/gpu/perf_table.py --out "$OUT/perf.json" 2>&1 | tee "$OUT/perf.log"
rc_perf=${PIPESTATUS[0]}

{
    echo "== summary ($(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
    grep -E '^(variant|local-bf16|te-bf16|te-fp8|# m2-1b|# DALI)' "$OUT/perf.log" || echo "(no MFU table)"
    echo "# loss kernel vs unfused (tests/gpu/test_loss_kernel.py):"
    grep -E 'ms +peak' "$OUT/gpu_tests.log" || echo "(no loss kernel table)"
    tail -n 1 "$OUT/perf.log"
    echo "gpu_tests_rc=$rc_tests nccl_tests_rc=$rc_nccl perf_rc=$rc_perf seconds=$((SECONDS - START))"
} | tee "$OUT/summary.txt"
[ "$rc_tests" -eq 0 ] && [ "$rc_nccl" -eq 0 ] && [ "$rc_perf" -eq 0 ]
