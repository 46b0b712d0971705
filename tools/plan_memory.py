"""Per-rank memory of a training step by category, and FLOPs per sample, for a preset and a layout.

    .venv/bin/python tools/plan_memory.py --preset m2-10b --tp 2 --pp 4 --dp 32 --micro-batch 32 \
        --microbatches 16 --last-stage-layers 3 --precision bf16 --recompute selective --distributed-optimizer
    .venv/bin/python tools/plan_memory.py --config launch/examples/m2-10b_h100_256.yaml [--section.field=value ...]

Prints one row per pipeline rank (every TP/DP rank of a stage holds the same) with its tower layers per
chunk, the optimizer state with the other distributed-optimizer setting, and a last key=value summary
line. --config reads every setting from a recipe, at its launch size (launch.nodes × procs_per_node).
The model behind the numbers is m2megatron/planning (docs/PERFORMANCE.md §2), validated against
measured peaks on CPU by tests/distributed/test_memory_planner.py.
"""

from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from m2megatron.config import load_config  # noqa: E402
from m2megatron.config.model import preset  # noqa: E402
from m2megatron.planning.flops import forward_flops_per_sample, train_flops_per_sample  # noqa: E402
from m2megatron.planning.memory import CATEGORIES, PRECISIONS, PlanInput, plan_memory  # noqa: E402

GIB = 2 ** 30


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="plan this recipe (YAML) at its launch size; overrides follow")
    p.add_argument("--preset", default="m2-1b", help="model preset (tiny, m2-0.4b, m2-1b, m2-10b)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--vp", type=int, default=None, help="virtual stages per pipeline rank")
    p.add_argument("--first-stage-layers", type=int, default=None, help="tower layers on the first stage")
    p.add_argument("--last-stage-layers", type=int, default=None, help="tower layers on the last stage")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per microbatch per DP rank (b)")
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per step per DP rank (M)")
    p.add_argument("--image-size", type=int, default=None, help="override the image side (sequence length)")
    p.add_argument("--text-len", type=int, default=None, help="override the caption length in tokens")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--recompute", nargs="?", const="full", default="none", choices=["none", "selective", "full"],
                   help="activation recompute (bare --recompute: full)")
    p.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    p.add_argument("--recompute-num-layers", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--loss-group", type=int, default=None, help="loss group size G (default: DP, global)")
    p.add_argument("--accumulation", type=int, default=1, help="A, microbatches per loss (two-pass)")
    p.add_argument("--chunk", type=int, default=None, help="column tile of the chunked loss")
    p.add_argument("--reserve-gib", type=float, default=0.0, help="per-process runtime reserve (CUDA, NCCL)")
    return p.parse_known_args(argv)


def plan_from_args(args: argparse.Namespace, overrides: list[str] | None = None) -> PlanInput:
    reserve = int(args.reserve_gib * GIB)
    if args.config:
        cfg = load_config(args.config, overrides or [])
        world = cfg.launch.world_size()
        return PlanInput.from_run_config(cfg.validate(world), world, runtime_reserve_bytes=reserve)
    if overrides:
        raise SystemExit(f"plan_memory.py: unrecognized arguments {' '.join(overrides)} (overrides need --config)")
    model = preset(args.preset)
    if args.image_size:
        model.image_size = args.image_size
    if args.text_len:
        model.max_text_len = args.text_len
    model.validate()
    return PlanInput(model=model, tp=args.tp, pp=args.pp, dp=args.dp, vp=args.vp, micro_batch=args.micro_batch,
                     num_microbatches=args.microbatches, first_stage_layers=args.first_stage_layers,
                     last_stage_layers=args.last_stage_layers, precision=args.precision, recompute=args.recompute,
                     recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
                     sequence_parallel=args.sequence_parallel, distributed_optimizer=args.distributed_optimizer,
                     loss_group_size=args.loss_group, accumulation=args.accumulation, chunk=args.chunk,
                     runtime_reserve_bytes=reserve)


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    plan = plan_from_args(args, overrides)
    ranks = plan_memory(plan)
    other = "without" if plan.distributed_optimizer else "with"
    print(f"# {plan.model.preset}: TP={plan.tp} PP={plan.pp} DP={plan.dp} VP={plan.vp} "
          f"first/last_stage_layers={plan.first_stage_layers}/{plan.last_stage_layers} b={plan.micro_batch} "
          f"M={plan.num_microbatches} {plan.precision} recompute={plan.recompute} SP={plan.sequence_parallel} "
          f"distributed_optimizer={plan.distributed_optimizer} G={plan.group} A={plan.accumulation} "
          f"chunk={plan.chunk}; GiB per rank")
    print(f"{'pp':>3} {'layers':>14} {'params':>12} " + " ".join(f"{c[:11]:>11}" for c in CATEGORIES)
          + f" {'total':>9} {'optim ' + other[:4] + '.':>11}")
    for r in ranks:
        layers = ",".join(f"{s}-{e}" for s, e in r.layer_ranges)
        print(f"{r.pp_rank:>3} {layers:>14} {r.parameters_count:>12,} "
              + " ".join(f"{r.bytes[c] / GIB:11.3f}" for c in CATEGORIES)
              + f" {r.total / GIB:9.2f} {r.optimizer_alternative / GIB:11.3f}")
    full = plan.recompute == "full"
    fwd, train = forward_flops_per_sample(plan.model), train_flops_per_sample(plan.model, full)
    print(f"# FLOPs per sample: forward {fwd / 1e9:.2f} GFLOP, train step {train / 1e9:.2f} GFLOP "
          f"(full recompute={full})")
    worst = max(ranks, key=lambda r: r.total)
    print(f"peak_gib={worst.total / GIB:.3f} peak_pp_rank={worst.pp_rank} forward_gflops_per_sample={fwd / 1e9:.3f} "
          f"train_gflops_per_sample={train / 1e9:.3f}")


if __name__ == "__main__":
    main()
