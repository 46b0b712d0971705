"""Per-rank memory of a training step by category, and FLOPs per sample, for a preset and a layout.

    .venv/bin/python tools/plan_memory.py --preset m2-10b --tp 4 --pp 3 --dp 64 --micro-batch 16 \
        --microbatches 8 --precision bf16 --recompute --distributed-optimizer

Prints one row per pipeline rank (every TP/DP rank of a stage holds the same), the optimizer state
with the other distributed-optimizer setting, and a last key=value summary line. The model behind the
numbers is m2megatron/planning (docs/PERFORMANCE.md §2), validated against measured peaks on CPU by
tests/distributed/test_memory_planner.py.
"""

from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from m2megatron.config.model import preset  # noqa: E402
from m2megatron.planning.flops import forward_flops_per_sample, train_flops_per_sample  # noqa: E402
from m2megatron.planning.memory import CATEGORIES, PlanInput, plan_memory  # noqa: E402

GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="m2-1b", help="model preset (tiny, m2-0.4b, m2-1b, m2-10b)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--vp", type=int, default=None, help="virtual stages per pipeline rank")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per microbatch per DP rank (b)")
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per step per DP rank (M)")
    p.add_argument("--image-size", type=int, default=None, help="override the image side (sequence length)")
    p.add_argument("--text-len", type=int, default=None, help="override the caption length in tokens")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default="bf16")
    p.add_argument("--recompute", action="store_true", help="full activation recompute")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--loss-group", type=int, default=None, help="loss group size G (default: DP, global)")
    p.add_argument("--accumulation", type=int, default=1, help="A, microbatches per loss (two-pass)")
    p.add_argument("--chunk", type=int, default=None, help="column tile of the chunked loss")
    p.add_argument("--reserve-gib", type=float, default=0.0, help="per-process runtime reserve (CUDA, NCCL)")
    return p.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> PlanInput:
    model = preset(args.preset)
    if args.image_size:
        model.image_size = args.image_size
    if args.text_len:
        model.max_text_len = args.text_len
    model.validate()
    return PlanInput(model=model, tp=args.tp, pp=args.pp, dp=args.dp, vp=args.vp, micro_batch=args.micro_batch,
                     num_microbatches=args.microbatches, precision=args.precision, recompute=args.recompute,
                     distributed_optimizer=args.distributed_optimizer, loss_group_size=args.loss_group,
                     accumulation=args.accumulation, chunk=args.chunk,
                     runtime_reserve_bytes=int(args.reserve_gib * GIB))


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = plan_from_args(args)
    ranks = plan_memory(plan)
    other = "without" if plan.distributed_optimizer else "with"
    print(f"# {args.preset}: TP={plan.tp} PP={plan.pp} DP={plan.dp} VP={plan.vp} b={plan.micro_batch} "
          f"M={plan.num_microbatches} {plan.precision} recompute={plan.recompute} "
          f"distributed_optimizer={plan.distributed_optimizer} G={plan.group} A={plan.accumulation} "
          f"chunk={plan.chunk}; GiB per rank")
    print(f"{'pp':>3} {'params':>12} " + " ".join(f"{c[:11]:>11}" for c in CATEGORIES)
          + f" {'total':>9} {'optim ' + other[:4] + '.':>11}")
    for r in ranks:
        print(f"{r.pp_rank:>3} {r.parameters_count:>12,} " + " ".join(f"{r.bytes[c] / GIB:11.3f}" for c in CATEGORIES)
              + f" {r.total / GIB:9.2f} {r.optimizer_alternative / GIB:11.3f}")
    fwd, train = forward_flops_per_sample(plan.model), train_flops_per_sample(plan.model, plan.recompute)
    print(f"# FLOPs per sample: forward {fwd / 1e9:.2f} GFLOP, train step {train / 1e9:.2f} GFLOP "
          f"(recompute={plan.recompute})")
    worst = max(ranks, key=lambda r: r.total)
    print(f"peak_gib={worst.total / GIB:.3f} peak_pp_rank={worst.pp_rank} forward_gflops_per_sample={fwd / 1e9:.3f} "
          f"train_gflops_per_sample={train / 1e9:.3f}")


if __name__ == "__main__":
    main()
