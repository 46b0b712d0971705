"""GPU performance figures for tests/gpu/run.sh (a script, not a test; needs CUDA, ~2-3 minutes on an H200).

    python tests/gpu/perf_table.py [--out perf.json] [--batch 32] [--steps 20] [--peak-tflops 989]

Training steps of the m2-1b shape on one GPU through the stage runtime, as the trainer runs them (Megatron DDP
with fp32 main gradients, Megatron's optimizer, the contrastive loss), bf16 weights, for each variant of the layer
implementation. The batch is made on the device once, so a step times the device's work, not the host's.
Per variant:
- ms/step and samples/s: the median step after 3 warm-up steps;
- MFU (model FLOPs, no recompute) and HFU (recompute included) over the dense peak of the exact device
  (planning.flops.peak_tflops: H100 SXM / PCIe / NVL, H200; --peak-tflops or M2_PEAK_TFLOPS overrides);
- the peak of `max_memory_allocated` and of `max_memory_reserved` (the allocator's cache too; neither holds the
  CUDA context or NCCL's buffers), after `gc.collect()` (Megatron's DDP hooks hold reference cycles, so the last
  variant's memory is freed only by the collector) and the memory planner's estimate of the same rank;
- the optimizer that stepped (read from the object: without TE or apex Megatron falls back to
  torch.optim.AdamW, not fused) and the attention kernel that ran (torch.profiler's op names of one warm-up
  step: flash, efficient, cudnn or math; none for Megatron's own unfused attention).
Variants needing Transformer Engine report "needs an NGC host" where it is not installed.
Prints "[figure]" lines (tests/gpu/figures.py); writes the rows as JSON with --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "kernels")]

from tests.gpu.figures import attention_kernel, figure  # noqa: E402

PRESET = "m2-1b"
VARIANTS = {  # name: overrides
    "local-bf16": ["--model.attention=megatron"],
    "local-sdpa-bf16": ["--model.attention=sdpa"],
    "local-sdpa-bf16-selective": ["--model.attention=sdpa", "--train.recompute=selective"],
    "te-bf16": ["--model.layer_spec=te"],
    "te-fp8": ["--model.layer_spec=te", "--model.fp8=delayed"],
}
WARMUP = 3


def _has_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - TE raises more than ImportError when broken
        return False
    return True


def _config(overrides: list[str], batch: int):
    from m2megatron.config import load_config

    return load_config(preset_name=PRESET, overrides=[
        "--train.precision=bf16", f"--train.micro_batch_size={batch}", "--optim.lr=1e-4", *overrides])


def _flops(cfg, batch: int, seconds: float, peak: float) -> tuple[float, float]:
    from m2megatron.planning import flops

    model = flops.model_flops_per_sample(cfg.model) * batch / seconds / 1e12
    hardware = flops.hardware_flops_per_sample(cfg.model, cfg.train.recompute) * batch / seconds / 1e12
    return model / peak, hardware / peak


def optimizer_name(optimizer) -> str:
    """The chain of optimizer classes down to the torch optimizer that steps, with its fused / foreach mode."""
    import torch

    names, opt = [], optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        names.append(type(opt).__name__)
        chained = getattr(opt, "chained_optimizers", None)
        opt = chained[0] if chained else getattr(opt, "optimizer", None)
    if opt is not None:
        mode = [k for k in ("fused", "foreach") if opt.defaults.get(k)] or ["for-loop"]
        names.append(f"{type(opt).__name__}({','.join(mode)})")
    return ">".join(names)


def _profiled_attention(run_step) -> str:
    """The attention kernel of one step, from the op names torch.profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step()
    ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention_backward" in e.key}
    return attention_kernel(ops) if ops else "none (unfused bmm+softmax)"


def _memory() -> dict:
    import torch

    return dict(alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                reserved_gib=torch.cuda.max_memory_reserved() / 2**30)


def _clean_allocator() -> None:
    import torch

    gc.collect()  # the previous variant's DDP hooks hold reference cycles
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _train_step(stages, step, batches) -> None:
    for chunk in stages.chunks:
        chunk.zero_grad_buffer()
    stages.optimizer.zero_grad()
    step(batches)
    stages.optimizer.step()


def _time_steps(stages, step, batches, steps: int) -> tuple[float, str]:
    """(median seconds of the steps after the warm-up, the attention kernel a profiled warm-up step ran)."""
    import torch

    times, kernel = [], None
    for i in range(max(steps, WARMUP + 1)):
        if i == 1:  # a warm-up step: the profiler's overhead stays out of the timings
            kernel = _profiled_attention(lambda: _train_step(stages, step, batches))
            continue
        torch.cuda.synchronize()
        start = time.perf_counter()
        _train_step(stages, step, batches)
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], kernel


def run_variant(groups, name: str, batch: int, steps: int) -> dict:
    import torch

    from m2megatron.parallel.device import to_device
    from m2megatron.planning.flops import peak_tflops
    from m2megatron.planning.measure import synthetic_microbatches
    from m2megatron.planning.memory import PlanInput, peak_rank
    from m2megatron.runtime import ContrastiveStep, build_stages

    cfg = _config(VARIANTS[name], batch)
    _clean_allocator()
    stages = build_stages(cfg, groups)
    batches = [to_device(b, groups.device) for b in synthetic_microbatches(cfg, 1)]  # on the device once
    seconds, kernel = _time_steps(stages, ContrastiveStep(stages), batches, steps)
    device = torch.cuda.get_device_name()
    peak = peak_tflops(device, "fp8" if cfg.model.fp8 != "none" else "bf16",
                       torch.cuda.get_device_properties(0).total_memory) or float("nan")
    mfu, hfu = _flops(cfg, batch, seconds, peak)
    planned = peak_rank(PlanInput.from_run_config(cfg, world_size=1)).total
    row = dict(variant=name, batch=batch, step_ms=seconds * 1e3, samples_s=batch / seconds, mfu=mfu, hfu=hfu,
               peak_tflops=peak, **_memory(), planned_gib=planned / 2**30,
               optimizer=optimizer_name(stages.optimizer), attention=kernel)
    del stages, batches
    _clean_allocator()
    return row


def table_lines(rows: list[dict], header: str) -> list[str]:
    """The table and its key=value line, as figure lines."""
    lines = [figure(header), figure(f"{'variant':<26} {'ms/step':>8} {'samples/s':>10} {'MFU':>6} {'HFU':>6} "
                                    f"{'alloc GiB':>9} {'rsrvd GiB':>9} {'planned':>8}  attention / optimizer")]
    summary = {}
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(figure(f"{r['variant']:<26} {r.get('skipped') or 'ERROR ' + r['error'][:200]}"))
            continue
        lines.append(figure(
            f"{r['variant']:<26} {r['step_ms']:8.1f} {r['samples_s']:10.1f} {r['mfu']:6.1%} {r['hfu']:6.1%} "
            f"{r['alloc_gib']:9.2f} {r['reserved_gib']:9.2f} {r['planned_gib']:8.2f}  "
            f"{r['attention']} / {r['optimizer']}"))
        summary[f"mfu_{r['variant']}"] = f"{r['mfu']:.3f}"
        summary[f"mem_ratio_{r['variant']}"] = f"{r['alloc_gib'] / r['planned_gib']:.2f}"
    lines.append(figure(" ".join(f"{k}={v}" for k, v in summary.items()) or "no variant ran"))
    return lines


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak to divide by (else by device)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf_table: CUDA is not available", file=sys.stderr)
        return 1
    if args.peak_tflops:
        os.environ["M2_PEAK_TFLOPS"] = str(args.peak_tflops)
    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, seed_everything

    groups = initialize(ParallelConfig())
    seed_everything(0, groups)
    rows = []
    for name in VARIANTS:
        if name.startswith("te") and not _has_te():
            rows.append(dict(variant=name, skipped="needs an NGC host (Transformer Engine)"))
            continue
        try:
            rows.append(run_variant(groups, name, args.batch, args.steps))
        except Exception as exc:  # report and go on: one broken variant must not hide the others
            rows.append(dict(variant=name, error=f"{type(exc).__name__}: {exc}"))
    peak = next((r["peak_tflops"] for r in rows if "peak_tflops" in r), float("nan"))
    header = (f"m2-1b training step, bf16 weights, b={args.batch}, {args.steps} steps, {torch.cuda.get_device_name()}"
              f", peak {peak:.0f} TFLOP/s")
    print("\n".join(table_lines(rows, header)))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0 if any("step_ms" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
