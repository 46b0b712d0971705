"""Quick stand-ins of the GPU check's stages, for its CPU rehearsal (`GPU_CHECK_REHEARSAL=1 bash tests/gpu/run.sh`).

    python tests/gpu/rehearsal.py STAGE       # gpu_tests, nccl, subln, e2e or perf

Each prints what its stage prints, through the stage's own line formatters (so the summary's greps meet the real
format), and writes a bulky file into the check's work folder ($GPU_CHECK_WORK), never under $OUT.
GPU_CHECK_REHEARSAL_HANG=STAGE makes that stage hang (the budget must cut it); GPU_CHECK_REHEARSAL_FAIL=STAGE
makes it fail after printing.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]

from tests.gpu.figures import attention_line  # noqa: E402


def gpu_tests() -> list[str]:
    return [".", attention_line("no mask", {"aten::_scaled_dot_product_cudnn_attention"}),
            "SKIPPED [1] tests/gpu/test_te_spec.py:20: needs an NGC host (Transformer Engine is not installed)"]


def nccl() -> list[str]:
    return ["2 passed in 1.00s"]


def subln() -> list[str]:
    from tools.bench_subln import result_line

    return [result_line("cuda", "rehearsal", 8192, 2048, eager_ms=2.0, fused_ms=1.0)]


def e2e() -> list[str]:
    from tests.gpu.end_to_end import record_line

    return [record_line({"first_run_s": 1.0, "resumed_run_s": 1.0, "i2t_r1": 0.5, "resumed_from_25": True})]


def perf() -> list[str]:
    from tests.gpu.perf_table import table_lines

    row = dict(variant="local-sdpa-bf16", batch=32, step_ms=100.0, samples_s=320.0, mfu=0.4, hfu=0.45,
               alloc_gib=20.0, reserved_gib=22.0, planned_gib=21.0, attention="flash",
               optimizer="Float16OptimizerWithFloat16Params>AdamW(foreach)")
    return table_lines([row, dict(variant="te-fp8", skipped="needs an NGC host (Transformer Engine)")],
                       "m2-1b training step (rehearsal)")


def main(stage: str) -> int:
    lines = {"gpu_tests": gpu_tests, "nccl": nccl, "subln": subln, "e2e": e2e, "perf": perf}[stage]()
    (Path(os.environ["GPU_CHECK_WORK"]) / f"{stage}.bulky").write_bytes(b"\0" * 2**20)
    print("\n".join(lines), flush=True)
    if os.environ.get("GPU_CHECK_REHEARSAL_HANG") == stage:  # after its figures: a cut stage keeps what it printed
        time.sleep(3600)
    return 1 if os.environ.get("GPU_CHECK_REHEARSAL_FAIL") == stage else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
