"""Layouts of a model on N GPUs that fit in memory, fastest first, with the loss modes' communication.

    .venv/bin/python tools/plan_layout.py --gpus 256 --gpu h100              # the 10B preset, bf16
    .venv/bin/python tools/plan_layout.py --gpus 256 --gpu h200 --precision fp8 --mfu 0.35
    .venv/bin/python tools/plan_layout.py --config launch/examples/m2-10b_h100_256.yaml   # one recipe

Each row: the layout (TP, PP, VP, the pipeline split first/last = tower layers on the first / last
stage, DP, microbatch b, microbatches M, recompute, sequence parallelism, distributed optimizer), the
fullest rank's memory, the estimated step time and model MFU at the assumed hardware MFU, the stage FLOP
imbalance and pipeline bubble, the DP gradient bytes, and the loss bytes per rank per step of three loss
modes: global (G = P), grouped inside a node (G = 8/TP) and accumulated over the step's microbatches
(A = M, two passes). Method and how to choose: docs/PERFORMANCE.md §3. Last line: key=value summary of
the fastest layout.

With --config the model, precision, global batch, GPU count (launch.nodes × launch.procs_per_node) and
GPUs per node come from the recipe: it prints the search table for that cluster, then the recipe's own row,
its pipeline ranks (layers, forward-FLOP share, memory) and a last line `fits=1 ...` if it fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from m2megatron.config import load_config  # noqa: E402
from m2megatron.config.model import preset  # noqa: E402
from m2megatron.planning.flops import PEAK_TFLOPS, device_model  # noqa: E402
from m2megatron.planning.layouts import (  # noqa: E402
    GPUS,
    Cluster,
    LayoutRow,
    estimate,
    largest_microbatch_per_layout,
    plan_layouts,
)
from m2megatron.planning.memory import PlanInput, plan_memory  # noqa: E402
from m2megatron.planning.stage_balance import stage_split  # noqa: E402

GIB, GB = 2 ** 30, 1e9
LOSS_MODES = ["G=P", "G=node", "A=M"]


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="evaluate this recipe (YAML) and search its cluster")
    p.add_argument("--preset", default="m2-10b")
    p.add_argument("--gpus", type=int, default=256, help="N, total GPUs")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16384, help="samples per optimizer step")
    p.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed hardware FLOPs utilisation")
    p.add_argument("--network-gbs", type=float, default=50.0, help="per-GPU inter-node GB/s")
    p.add_argument("--loss-group", type=int, default=None, help="G used for memory and time (default DP)")
    p.add_argument("--chunk", type=int, default=None, help="chunked loss tile (memory)")
    p.add_argument("--no-overlap", action="store_true", help="plan without overlap_grad_reduce / overlap_param_gather")
    p.add_argument("--no-sequence-parallel", action="store_true", help="do not search sequence parallelism")
    p.add_argument("--no-search", action="store_true", help="with --config: only the recipe's rows, no search table")
    p.add_argument("--top", type=int, default=20, help="rows to print")
    p.add_argument("--every-microbatch", action="store_true",
                   help="one row per microbatch size (default: the largest b that fits per layout)")
    return p.parse_known_args(argv)


def _header() -> str:
    return (f"{'TP':>3} {'PP':>3} {'VP':>3} {'split':>6} {'DP':>4} {'b':>3} {'M':>4} {'rc':>4} {'sp':>2} {'dopt':>4} "
            f"{'mem GiB':>8} {'step s':>7} {'MFU':>5} {'imb':>5} {'bubble':>6} {'DP GB':>7} {'TP+PP GB':>8} "
            + " ".join(f"{'loss ' + n:>12}" for n in LOSS_MODES) + " (MB)")


def _split_text(p: PlanInput) -> str:
    if p.first_stage_layers is None and p.last_stage_layers is None:
        return "even" if p.pp > 1 else "-"
    return f"{'*' if p.first_stage_layers is None else p.first_stage_layers}/" \
           f"{'*' if p.last_stage_layers is None else p.last_stage_layers}"


def format_row(r: LayoutRow) -> str:
    p = r.plan
    return (f"{p.tp:>3} {p.pp:>3} {p.vp or '-':>3} {_split_text(p):>6} {p.dp:>4} {p.micro_batch:>3} "
            f"{p.num_microbatches:>4} {p.recompute[:4]:>4} {'y' if p.sequence_parallel else 'n':>2} "
            f"{'y' if p.distributed_optimizer else 'n':>4} {r.memory / GIB:8.1f} {r.step_s:7.2f} {r.model_mfu:5.2f} "
            f"{r.imbalance:5.3f} {r.bubble:6.3f} {r.dp_bytes / GB:7.2f} {r.tp_pp_bytes / GB:8.1f} "
            + " ".join(f"{r.loss_bytes[n] / 1e6:12.1f}" for n in LOSS_MODES))


def _cluster(args, num_gpus: int, gpus_per_node: int, precision: str) -> Cluster:
    peak = PEAK_TFLOPS[(device_model(args.gpu), "fp8" if precision == "fp8" else "bf16")]  # SXM
    return Cluster(num_gpus=num_gpus, gpu_memory=GPUS[args.gpu], gpus_per_node=gpus_per_node, peak_tflops=peak,
                   mfu=args.mfu, network_gbs=args.network_gbs)


def _search(args, model, cluster: Cluster, *, global_batch: int, precision: str, loss_group, chunk) -> list[LayoutRow]:
    rows = plan_layouts(model, cluster, global_batch=global_batch, precision=precision, loss_group_size=loss_group,
                        chunk=chunk, overlap=not args.no_overlap,
                        sequence_parallel=(False,) if args.no_sequence_parallel else (False, True))
    return rows if args.every_microbatch else largest_microbatch_per_layout(rows)


def _print_table(title: str, rows: list[LayoutRow], top: int) -> None:
    print(title)
    print("# columns: split = tower layers on the first/last pipeline stage (* = even share, the rest split evenly), "
          "rc = recompute, sp = sequence parallel, dopt = distributed optimizer, mem = fullest rank incl. a 4 GiB "
          "runtime reserve, imb = max/mean stage FLOPs, bubble = (PP-1)/(M*VP); loss = bytes sent per rank per "
          "step by the loss in each mode")
    print(_header())
    for r in rows[:top]:
        print(format_row(r))


def main_search(args) -> None:
    model = preset(args.preset)
    cluster = _cluster(args, args.gpus, args.gpus_per_node, args.precision)
    rows = _search(args, model, cluster, global_batch=args.global_batch, precision=args.precision,
                   loss_group=args.loss_group, chunk=args.chunk)
    _print_table(f"# {args.preset} on {args.gpus} × {args.gpu} ({GPUS[args.gpu] / GB:.0f} GB), global batch "
                 f"{args.global_batch}, {args.precision}, assumed MFU {args.mfu}: {len(rows)} layouts fit; fastest "
                 "first", rows, args.top)
    if rows:
        best, r = rows[0].plan, rows[0]
        print(f"fits={len(rows)} best_tp={best.tp} best_pp={best.pp} best_vp={best.vp} best_dp={best.dp} "
              f"best_first_stage_layers={best.first_stage_layers} best_last_stage_layers={best.last_stage_layers} "
              f"best_micro_batch={best.micro_batch} best_step_s={r.step_s:.3f} best_memory_gib={r.memory / GIB:.1f}")
    else:
        print("fits=0")


def main_recipe(args, overrides: list[str]) -> None:
    cfg = load_config(args.config, overrides)
    world = cfg.launch.world_size()
    cfg.validate(world)
    gpus_per_node = cfg.launch.gpus_per_node or args.gpus_per_node
    plan = PlanInput.from_run_config(cfg, world)
    cluster = _cluster(args, world, gpus_per_node, plan.precision)
    plan = dataclasses.replace(plan, runtime_reserve_bytes=int(cluster.reserve_bytes))
    row = estimate(plan, cluster)
    faster = None
    if not args.no_search:
        global_batch = plan.micro_batch * plan.num_microbatches * plan.dp
        precision = "fp8" if plan.precision == "fp8" else "bf16"
        rows = _search(args, cfg.model, cluster, global_batch=global_batch, precision=precision,
                       loss_group=plan.loss_group_size, chunk=plan.chunk)
        _print_table(f"# {args.config}: {cfg.model.preset} on {world} × {args.gpu} ({GPUS[args.gpu] / GB:.0f} GB), "
                     f"global batch {global_batch}, {precision}, assumed MFU {args.mfu}: {len(rows)} layouts fit; "
                     "fastest first", rows, args.top)
        faster = sum(r.step_s < row.step_s for r in rows)
    print(f"# the recipe {args.config} ({plan.precision}, overlap_grad_reduce={plan.overlap_grad_reduce}, "
          f"overlap_param_gather={plan.overlap_param_gather})"
          + ("" if faster is None else f"; {faster} searched layouts are faster"))
    print(_header())
    print(format_row(row))
    split = stage_split(cfg.model, plan.pp, plan.vp, plan.first_stage_layers, plan.last_stage_layers)
    total = sum(split.rank_flops)
    print(f"{'pp':>3} {'layers per chunk':>24} {'forward FLOPs':>14} {'share':>6} {'mem GiB':>8}")
    for rank, flops in zip(plan_memory(plan), split.rank_flops):
        ranges = " ".join(f"[{s},{e})" for s, e in rank.layer_ranges)
        print(f"{rank.pp_rank:>3} {ranges:>24} {flops / 1e12:11.3f} TF {flops / total:6.3f} {rank.total / GIB:8.1f}")
    print(f"fits={int(row.memory <= cluster.gpu_memory)} world_size={world} tp={plan.tp} pp={plan.pp} vp={plan.vp} "
          f"dp={plan.dp} first_stage_layers={plan.first_stage_layers} last_stage_layers={plan.last_stage_layers} "
          f"micro_batch={plan.micro_batch} microbatches={plan.num_microbatches} memory_gib={row.memory / GIB:.1f} "
          f"step_s={row.step_s:.3f} imbalance={split.imbalance:.4f} spread={split.spread:.4f} "
          f"bubble={row.bubble:.4f}" + ("" if faster is None else f" faster_layouts={faster}"))


def main(argv=None) -> None:
    args, rest = parse_args(argv)
    if args.config:
        main_recipe(args, rest)
    elif rest:
        raise SystemExit(f"plan_layout.py: unrecognized arguments {' '.join(rest)} (overrides need --config)")
    else:
        main_search(args)


if __name__ == "__main__":
    main()
