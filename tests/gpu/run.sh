#!/usr/bin/env bash
# The one GPU check (docs/PERFORMANCE.md, "The GPU check"). Plans for a bare single-GPU host: Python 3.12 with a
# CUDA torch, Triton and NCCL, no Megatron-Core, Transformer Engine or DALI, no network; it receives only this
# repository. From the repository root:
#     bash tests/gpu/run.sh          # OUT=/some/dir keeps the logs and JSON; PY picks the interpreter
# Wheels under .whl/ (megatron-core 0.16.1 for cp312, prepared with `make gpu-wheels`) are installed first.
# Transformer Engine and DALI cannot travel (hundreds of MB): their checks report "needs an NGC host".
#  1. every gpu-marked test (NCCL, Triton loss kernel and ring loss, SDPA attention, TE spec, DALI mixed);
#  2. the main job end to end on one GPU: 25 + 25 steps with a resume, webdataset shards, held-out eval;
#  3. 20 training steps of the m2-1b shape in bf16: samples/s, MFU, HFU, peak memory beside the planner's;
#  4. one table. Under 8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
OUT=${OUT:-$(mktemp -d -t m2-gpu-check.XXXX)}
mkdir -p "$OUT"
PY=${PY:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null
    then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/m2-site .whl/*.whl \
        || { echo "could not install the carried wheels in .whl/"; exit 1; }
    export PYTHONPATH=/tmp/m2-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONUNBUFFERED=1
"$PY" - <<'EOF' | tee "$OUT/env.txt"
import importlib.util, torch
print(f"# host: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
for name, what in (("megatron.core", "Megatron-Core"), ("transformer_engine", "Transformer Engine"), ("nvidia.dali", "DALI"), ("triton", "Triton")):
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    print(f"# {what}: {'present' if found else 'absent' + (' — needs an NGC host' if what in ('Transformer Engine', 'DALI') else '')}")
EOF

GPU_TESTS=(tests/gpu/test_loss_kernel.py tests/gpu/test_loss_ring.py tests/gpu/test_attention.py tests/gpu/test_timers.py
           tests/gpu/test_te_spec.py tests/gpu/test_dali_mixed.py tests/gpu/test_checkpoint_fused_adam.py)
NCCL_TESTS=(tests/gpu/test_nccl.py)  # makes its own NCCL world: its own pytest process
present=(); for f in "${GPU_TESTS[@]}"; do [ -f "$f" ] && present+=("$f"); done
echo "== gpu-marked tests (python: $PY, out: $OUT)"
timeout 240 "$PY" -m pytest -q -s -rA -p no:cacheprovider "${present[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}
timeout 60 "$PY" -m pytest -q -rA -p no:cacheprovider "${NCCL_TESTS[@]}" 2>&1 | tee "$OUT/nccl_tests.log"
rc_nccl=${PIPESTATUS[0]}

echo "== end to end (tiny preset, NCCL world of one)"
timeout 150 "$PY" tests/gpu/end_to_end.py --out "$OUT/e2e" 2>&1 | tail -n 40 | tee "$OUT/e2e.log"
rc_e2e=${PIPESTATUS[0]}

echo "== m2-1b training steps"
timeout 150 "$PY" tests/gpu/perf_table.py --out "$OUT/perf.json" 2>&1 | tee "$OUT/perf.log"
rc_perf=${PIPESTATUS[0]}

{
    echo "== summary ($(date -u +%Y-%m-%dT%H:%MZ))"
    cat "$OUT/env.txt"
    grep -E '^(# m2-1b|variant|local-|te-)' "$OUT/perf.log" || echo "(no m2-1b table)"
    echo "# loss kernel and ring vs the torch path (tests/gpu/test_loss_*.py):"
    grep -E 'ms +peak|^ring ' "$OUT/gpu_tests.log" || echo "(no loss kernel lines)"
    grep -E '^# (attention|DALI)' "$OUT/gpu_tests.log" || true
    grep -E 'SKIPPED.*NGC' "$OUT/gpu_tests.log" | sed 's/^/# /' || true
    grep -E '^e2e ' "$OUT/e2e.log" | sed 's/e2e //g; s/^/# end to end: /' || echo "# end to end: (no result)"
    tail -n 1 "$OUT/perf.log"
    echo "gpu_tests_rc=$rc_tests nccl_tests_rc=$rc_nccl e2e_rc=$rc_e2e perf_rc=$rc_perf seconds=$((SECONDS - START))"
} | tee "$OUT/summary.txt"
[ "$rc_tests" -eq 0 ] && [ "$rc_nccl" -eq 0 ] && [ "$rc_e2e" -eq 0 ] && [ "$rc_perf" -eq 0 ]
