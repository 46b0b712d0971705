#!/usr/bin/env bash
# The one GPU check (docs/PERFORMANCE.md, "The GPU check"). Plans for a bare single-GPU host: Python 3.12 with a
# CUDA torch, Triton and NCCL, no Megatron-Core, Transformer Engine or DALI, no network; it receives only this
# repository and the wheels under .whl/ (megatron-core 0.16.1 for cp312: `make gpu-wheels` on a networked host,
# then carry .whl/ beside the repository). From the repository root:
#     bash tests/gpu/run.sh        # OUT=dir keeps the results; GPU_CHECK_BUDGET_S (480) bounds the whole run
# Stops at once, with one line, when CUDA or Megatron-Core is missing. Stages, each in its own log:
#  gpu_tests  every gpu-marked test (Triton loss kernel and ring loss, SDPA attention, TE spec, DALI mixed);
#  nccl       NCCL collectives and the loss gather (its own process: it makes its own NCCL world);
#  subln      the fused TP Sub-LN against the eager one (tools/bench_subln.py);
#  e2e        the main job end to end on one GPU: 25 + 25 steps with a resume, webdataset shards, held-out eval;
#  perf       training steps of the m2-1b shape in bf16: samples/s, MFU, HFU, peak memory beside the planner's.
# One budget is shared out: each stage may use its weight's share of the time still left, so a stage that
# finishes early leaves its time to the later ones, and one that overruns is cut at its share.
# Under $OUT: summary.txt (every "[figure]" line of every stage, and each stage's result), env.txt and the
# five stage logs. Bulky files (shards, checkpoints, JSON, the installed wheels) go to a temporary folder.
# GPU_CHECK_REHEARSAL=1 replaces the stages by quick stand-ins (tests/gpu/rehearsal.py) and needs no CUDA:
# tests/unit/test_gpu_scripts.py runs it on the CPU so that a bug of this script shows before a GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-480}
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
RESERVE=10  # seconds kept for the summary
STAGES=(gpu_tests nccl subln e2e perf)
WEIGHTS=(30 6 9 25 30)
OUT=${OUT:-$(mktemp -d -t m2-gpu-check.XXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t m2-gpu-work.XXXX)
[ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
PY=${PY:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null
    then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        || { echo "gpu-check: stopped: could not install the carried wheels in .whl/ with $PY"; exit 2; }
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONUNBUFFERED=1 GPU_CHECK_WORK=$WORK

# Preflight: the environment into env.txt; exit 3 without CUDA (unless rehearsing), 4 without Megatron-Core.
REHEARSAL=$REHEARSAL "$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib.util, os, sys
try:
    import torch
except ImportError:
    print("# torch: absent"); sys.exit(3)
cuda = torch.cuda.is_available()
print(f"# host: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name() if cuda else 'no GPU'}"
      + (f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB" if cuda else ""))
found = {}
for name, what in (("megatron.core", "Megatron-Core"), ("transformer_engine", "Transformer Engine"),
                   ("nvidia.dali", "DALI"), ("triton", "Triton")):
    try:
        found[what] = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found[what] = False
    ngc = " (needs an NGC host)" if what in ("Transformer Engine", "DALI") else ""
    print(f"# {what}: {'present' if found[what] else 'absent' + ngc}")
if not cuda and os.environ["REHEARSAL"] != "1":
    sys.exit(3)
sys.exit(0 if found["Megatron-Core"] else 4)
EOF
rc=$?
case $rc in  # a stop is one line (the details stay in env.txt)
    0) cat "$OUT/env.txt" ;;
    3) echo "gpu-check: stopped: no CUDA device for $PY (torch absent or a CPU build; see $OUT/env.txt); run it on the GPU host with the carried .whl/ from \`make gpu-wheels\`"; exit 3 ;;
    4) echo "gpu-check: stopped: Megatron-Core is not importable by $PY; run \`make gpu-wheels\` on a networked host and carry .whl/ beside the repository"; exit 4 ;;
    *) echo "gpu-check: stopped: the environment check failed (rc=$rc, see $OUT/env.txt)"; exit "$rc" ;;
esac

GPU_TESTS=()
for f in tests/gpu/test_loss_kernel.py tests/gpu/test_loss_ring.py tests/gpu/test_attention.py tests/gpu/test_timers.py \
         tests/gpu/test_te_spec.py \
         tests/gpu/test_dali_mixed.py tests/gpu/test_checkpoint_fused_adam.py tests/gpu/test_uint8_images.py \
         tests/gpu/test_sub_ln_triton.py; do [ -f "$f" ] && GPU_TESTS+=("$f"); done
PYTEST=("$PY" -m pytest -q -s -rA -p no:cacheprovider)

run_stage() {  # name seconds: the stage's command under `timeout` (its whole process group), logged
    local name=$1 seconds=$2
    if [ "$REHEARSAL" = 1 ]; then set -- "$PY" tests/gpu/rehearsal.py "$name"
    else case $name in
        gpu_tests) set -- "${PYTEST[@]}" "${GPU_TESTS[@]}" ;;
        nccl) set -- "${PYTEST[@]}" tests/gpu/test_nccl.py ;;
        subln) set -- "$PY" tools/bench_subln.py --device cuda ;;
        e2e) set -- "$PY" tests/gpu/end_to_end.py --out "$WORK/e2e" ;;
        perf) set -- "$PY" tests/gpu/perf_table.py --out "$WORK/perf.json" ;;
    esac; fi
    echo "== $name (at most ${seconds}s): $*"
    timeout -k 10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    return "$rc"
}

RESULTS=()
failed=0
for i in "${!STAGES[@]}"; do
    name=${STAGES[$i]}
    left=$((BUDGET - (SECONDS - START) - RESERVE))
    weights=0; for w in "${WEIGHTS[@]:$i}"; do weights=$((weights + w)); done
    share=$((left * WEIGHTS[i] / weights))
    if [ "$share" -lt 3 ]; then
        RESULTS+=("$name: not run (no time left of the ${BUDGET}s budget)"); failed=1; continue
    fi
    t0=$SECONDS
    run_stage "$name" "$share"
    rc=$?
    took=$((SECONDS - t0))
    case $rc in
        0) RESULTS+=("$name: ok in ${took}s (share ${share}s)") ;;
        124|137) RESULTS+=("$name: CUT at its share of ${share}s"); failed=1 ;;
        *) RESULTS+=("$name: FAILED rc=$rc in ${took}s (share ${share}s)"); failed=1 ;;
    esac
done

{
    echo "== GPU check summary ($(date -u +%Y-%m-%dT%H:%MZ), budget ${BUDGET}s$([ "$REHEARSAL" = 1 ] && echo ', REHEARSAL: stand-in stages'))"
    cat "$OUT/env.txt"
    for name in "${STAGES[@]}"; do
        echo "# $name"
        grep -ho '\[figure\] .*' "$OUT/$name.log" 2>/dev/null | sed 's/^\[figure\] /  /'
        grep -h 'SKIPPED.*NGC' "$OUT/$name.log" 2>/dev/null | sed 's/^/  /'
    done
    printf '%s\n' "${RESULTS[@]}"
    echo "seconds=$((SECONDS - START)) ok=$([ "$failed" = 0 ] && echo yes || echo no)"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$failed"
