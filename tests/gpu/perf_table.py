"""GPU performance figures for tests/gpu/run.sh (a script, not a test; needs CUDA, ~2-3 minutes on an H200).

    python tests/gpu/perf_table.py [--out perf.json] [--batch 32] [--steps 20]

20 training steps of the m2-1b shape on one GPU through the stage runtime, exactly as the trainer runs them
(Megatron DDP with fp32 main gradients, Megatron's mixed-precision Adam, the contrastive loss): bf16 weights,
for each variant of the layer implementation. Per variant: samples/s (after 3 warm-up steps), MFU (model
FLOPs: no recompute) and HFU (hardware FLOPs: recompute included) over the device's dense peak,
`torch.cuda.max_memory_allocated`, and the memory planner's estimate of the same rank (planning.memory).
Variants needing Transformer Engine report "needs an NGC host" where it is not installed.
Prints a table and a last key=value line; writes the rows as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "kernels")]

PRESET = "m2-1b"
VARIANTS = {  # name: overrides
    "local-bf16": ["--model.attention=megatron"],
    "local-sdpa-bf16": ["--model.attention=sdpa"],
    "local-sdpa-bf16-selective": ["--model.attention=sdpa", "--train.recompute=selective"],
    "te-bf16": ["--model.layer_spec=te"],
    "te-fp8": ["--model.layer_spec=te", "--model.fp8=delayed"],
}


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

    model = flops.train_flops_per_sample(cfg.model, False) * batch / seconds / 1e12
    hardware_fn = getattr(flops, "hardware_flops_per_sample", None)  # the recompute-aware count
    hardware = (hardware_fn(cfg.model, cfg.train.recompute) if hardware_fn else
                flops.train_flops_per_sample(cfg.model, cfg.train.recompute == "full")) * batch / seconds / 1e12
    return model / peak, hardware / peak


def run_variant(groups, name: str, batch: int, steps: int) -> dict:
    from m2megatron.planning.flops import peak_tflops
    from m2megatron.planning.measure import synthetic_microbatches
    from m2megatron.planning.memory import PlanInput, peak_rank
    from m2megatron.runtime import ContrastiveStep, build_stages

    cfg = _config(VARIANTS[name], batch)
    stages = build_stages(cfg, groups)
    step = ContrastiveStep(stages)
    batches = synthetic_microbatches(cfg, 1)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for chunk in stages.chunks:
            chunk.zero_grad_buffer()
        stages.optimizer.zero_grad()
        step(batches)
        stages.optimizer.step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = peak_tflops(torch.cuda.get_device_name(), "fp8" if cfg.model.fp8 != "none" else "bf16") or float("nan")
    mfu, hfu = _flops(cfg, batch, seconds, peak)
    planned = peak_rank(PlanInput.from_run_config(cfg, world_size=1)).total
    row = dict(variant=name, batch=batch, step_ms=seconds * 1e3, samples_s=batch / seconds, mfu=mfu, hfu=hfu,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, planned_gib=planned / 2**30)
    del stages, step
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf_table: CUDA is not available", file=sys.stderr)
        return 1
    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, seed_everything

    groups = initialize(ParallelConfig())
    seed_everything(0, groups)
    rows, summary = [], {}
    for name in VARIANTS:
        if name.startswith("te") and not _has_te():
            rows.append(dict(variant=name, skipped="needs an NGC host (Transformer Engine)"))
            continue
        try:
            rows.append(run_variant(groups, name, args.batch, args.steps))
        except Exception as exc:  # report and go on: one broken variant must not hide the others
            rows.append(dict(variant=name, error=f"{type(exc).__name__}: {exc}"))
    print(f"# m2-1b training step (bf16 weights, Megatron Adam), b={args.batch}, {args.steps} steps, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'variant':<26} {'ms/step':>8} {'samples/s':>10} {'MFU':>6} {'HFU':>6} {'peak GiB':>9} {'planned':>8}")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['variant']:<26} {r.get('skipped') or 'ERROR ' + r['error'][:200]}")
            continue
        print(f"{r['variant']:<26} {r['step_ms']:8.1f} {r['samples_s']:10.1f} {r['mfu']:6.1%} {r['hfu']:6.1%} "
              f"{r['peak_gib']:9.2f} {r['planned_gib']:8.2f}")
        summary[f"mfu_{r['variant']}"] = f"{r['mfu']:.3f}"
        summary[f"mem_ratio_{r['variant']}"] = f"{r['peak_gib'] / r['planned_gib']:.2f}"
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
