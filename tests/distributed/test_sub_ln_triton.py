"""The TP-sharded Sub-LN's Triton kernels (model.sub_ln_kernel='triton'), run by Triton's CPU interpreter on two
gloo ranks, equal the eager TPLayerNorm and an unsharded LayerNorm: output and the gradients of input, weight and
bias at TP2. Widths and rows are not multiples of the interpreter's 16-wide blocks, to exercise every mask.

TRITON_INTERPRET=1 must be set before triton is imported (its own library functions are jit'd at import), so the
check runs in a child process, this file as a script, which forks its two ranks.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import run_under_triton_interpreter

pytestmark = pytest.mark.distributed
WIDTH = 74  # 37 columns per rank
TOL = 1e-5  # fp32: the order of accumulation only (values and gradients of order 1-10)


def _parity(group) -> dict[str, float]:
    import torch.distributed as dist

    from m2megatron.models import TPLayerNorm
    from m2megatron.models.sub_ln import use_triton
    from tests.tp_layer_norm import max_abs_diff, sharded_run, unsharded_case

    inputs, want = unsharded_case(WIDTH, rows=(7, 3), seed=5)
    sl = slice(dist.get_rank() * WIDTH // 2, (dist.get_rank() + 1) * WIDTH // 2)
    got = {kernel: sharded_run(TPLayerNorm(WIDTH, eps=1e-5, tp_group=group, kernel=kernel), inputs, sl)
           for kernel in ("eager", "triton")}
    unsharded = [want[0][..., sl], want[1][..., sl], want[2][sl], want[3][sl]]
    return {"triton_vs_eager": max_abs_diff(got["triton"], got["eager"]),
            "triton_vs_unsharded": max_abs_diff(got["triton"], unsharded),
            "auto_picks_triton_on_cpu": use_triton("auto", inputs[0])}


def _rank(rank: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from m2megatron.parallel import initialize, shutdown
    from m2megatron.parallel.launch_env import local_rank_env

    initialize(env=local_rank_env(rank, 2, store=dist.FileStore(store_path, 2)), megatron_state=False)
    try:
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(_parity(dist.group.WORLD)))
    finally:
        shutdown()


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(f"{tmp}/store", tmp), nprocs=2, start_method="fork")
        print(json.dumps([json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(2)]))


def test_triton_sub_ln_equals_eager_and_unsharded_layernorm_at_tp2():
    pytest.importorskip("triton")
    for diff in run_under_triton_interpreter(__file__, timeout=300):
        assert diff["triton_vs_eager"] <= TOL and diff["triton_vs_unsharded"] <= TOL, diff
        assert not diff["auto_picks_triton_on_cpu"], diff


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[2])]
    main()
