"""Benchmark of the TP-sharded Sub-LN (models.sub_ln): the fused variants against the eager one, forward + backward.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_subln.py            # CPU, fp32: torch.compile vs eager
    python tools/bench_subln.py --device cuda                          # GPU, bf16: Triton and compile vs eager

The passes around the statistics all-reduce, alone: the group is one rank, so the collective (the same
all-reduce of [rows, 2] fp32 in every variant) is left out. Variants:
- eager: sub_ln.eager_tp_layer_norm, the TP > 1 path of model.sub_ln_kernel='eager' (about ten fp32 ops);
- compiled: torch.compile of that same function (inductor: C++ on a CPU, Triton on a GPU);
- triton: the Triton kernels of model.sub_ln_kernel='triton' (m2megatron_kernels.sub_ln_triton; CUDA only).
Per variant: the largest difference from eager over output, ∂x, ∂w and ∂b (relative to each tensor's largest
eager value) and the median milliseconds of forward + backward; one "[figure]" line each with the ratio
eager / variant (> 1: the variant is faster). Exit status 1 when a variant disagrees with eager beyond
the dtype's tolerance (1e-4 fp32, 2e-2 bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "kernels")]

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
# The tag the GPU check's summary collects (tests/gpu/figures.py); spelled out here, tools stay free of the test tree.
FIGURE = "[figure] "


def result_line(device: str, variant: str, rows: int, cols: int, eager_ms: float, fused_ms: float,
                error: float | None = None) -> str:
    diff = "" if error is None else f", max rel diff {error:.1e}"
    return (f"{FIGURE}sub-LN {variant} vs eager, {rows}x{cols} on {device}: {fused_ms:.3f} ms vs {eager_ms:.3f} ms "
            f"fwd+bwd = {eager_ms / fused_ms:.2f}x{diff}")


def _variants(device: str) -> dict:
    import importlib.util

    import torch

    from m2megatron.models.sub_ln import eager_tp_layer_norm, tp_layer_norm

    variants = {"eager": eager_tp_layer_norm}
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        variants["triton"] = lambda x, w, b, n, eps, group: tp_layer_norm(x, w, b, n, eps, group, kernel="triton")
    variants["compiled"] = torch.compile(eager_tp_layer_norm)  # last: its compile is the slowest part
    return variants


def _run(fn, x, w, b, grad_y):
    import torch.distributed as dist

    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves, x.shape[-1], 1e-5, dist.group.WORLD)
    y.backward(grad_y)
    return [y.detach()] + [leaf.grad for leaf in leaves]


def _time_ms(fn, x, w, b, grad_y, reps: int) -> float:
    import torch

    times = []
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _run(fn, x, w, b, grad_y)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _max_rel(got, want) -> float:
    return max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
               for g, r in zip(got, want))


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rows", type=int, default=None, help="tokens × batch (default 2048 on CPU, 197·32 on CUDA)")
    p.add_argument("--cols", type=int, default=None, help="this rank's columns (default 1024 on CPU, 8192 on "
                                                            "CUDA: the 10B FFN hidden at TP2)")
    p.add_argument("--dtype", default=None, choices=tuple(TOLERANCE), help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_subln: CUDA is not available", file=sys.stderr)
        return 1
    rows, cols = args.rows or (197 * 32 if cuda else 2048), args.cols or (8192 if cuda else 1024)
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    dtype, reps = getattr(torch, dtype_name), args.reps or (50 if cuda else 10)
    from m2megatron.parallel import initialize, shutdown
    from m2megatron.parallel.launch_env import shape_world_env

    initialize(env=shape_world_env(), megatron_state=False)  # a gloo world of one: the all-reduces are skipped
    gen = torch.Generator().manual_seed(0)
    x, grad_y = (torch.randn(rows, cols, generator=gen).to(args.device, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(cols, generator=gen)).to(args.device, dtype)
    b = torch.randn(cols, generator=gen).to(args.device, dtype)
    variants = _variants(args.device)
    want = _run(variants["eager"], x, w, b, grad_y)
    eager_ms, failed = None, False
    for name, fn in variants.items():
        try:
            error = _max_rel(_run(fn, x, w, b, grad_y), want)  # also the warm-up (compile)
            ms = _time_ms(fn, x, w, b, grad_y, reps)
        except Exception as exc:  # noqa: BLE001 - report and go on: one broken variant must not hide the others
            print(f"{FIGURE}sub-LN {name}: ERROR {type(exc).__name__}: {str(exc)[:200]}")
            failed = True
            continue
        eager_ms = eager_ms or ms
        failed |= error > TOLERANCE[dtype_name]
        if name != "eager":
            print(result_line(f"{args.device} {dtype_name}", name, rows, cols, eager_ms, ms, error), flush=True)
    shutdown()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
