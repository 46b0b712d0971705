"""Layouts of a model on N GPUs that fit in memory, fastest first, with the loss modes' communication.

    .venv/bin/python tools/plan_layout.py --gpus 256 --gpu h100              # the 10B preset, bf16
    .venv/bin/python tools/plan_layout.py --gpus 256 --gpu h200 --precision fp8 --mfu 0.35

Each row: the layout (TP, PP, VP, DP, microbatch b, microbatches M, recompute, distributed optimizer),
the fullest rank's memory, the estimated step time and model MFU at the assumed hardware MFU, the DP
gradient bytes, and the loss bytes per rank per step of three loss modes: global (G = P), grouped
inside a node (G = 8/TP) and accumulated over the step's microbatches (A = M, two passes). Method and
how to choose: docs/PERFORMANCE.md §3. Last line: key=value summary of the fastest layout.
"""

from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from m2megatron.config.model import preset  # noqa: E402
from m2megatron.planning.flops import PEAK_TFLOPS  # noqa: E402
from m2megatron.planning.layouts import GPUS, Cluster, largest_microbatch_per_layout, plan_layouts  # noqa: E402

GIB, GB = 2 ** 30, 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    p.add_argument("--top", type=int, default=20, help="rows to print")
    p.add_argument("--every-microbatch", action="store_true",
                   help="one row per microbatch size (default: the largest b that fits per layout)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = preset(args.preset)
    cluster = Cluster(num_gpus=args.gpus, gpu_memory=GPUS[args.gpu], gpus_per_node=args.gpus_per_node,
                      peak_tflops=PEAK_TFLOPS[(args.gpu, args.precision)], mfu=args.mfu,
                      network_gbs=args.network_gbs)
    rows = plan_layouts(model, cluster, global_batch=args.global_batch, precision=args.precision,
                        loss_group_size=args.loss_group, chunk=args.chunk)
    if not args.every_microbatch:
        rows = largest_microbatch_per_layout(rows)
    print(f"# {args.preset} on {args.gpus} × {args.gpu} ({GPUS[args.gpu] / GB:.0f} GB), global batch "
          f"{args.global_batch}, {args.precision}, assumed MFU {args.mfu}: {len(rows)} layouts fit; fastest first")
    print("# columns: rc = full recompute, dopt = distributed optimizer, mem = fullest rank incl. a 4 GiB runtime "
          "reserve; loss = bytes sent per rank per step by the loss in each mode")
    names = ["G=P", "G=node", "A=M"]
    print(f"{'TP':>3} {'PP':>3} {'VP':>3} {'DP':>4} {'b':>3} {'M':>4} {'rc':>3} {'dopt':>4} {'mem GiB':>8} "
          f"{'step s':>7} {'MFU':>5} {'DP GB':>7} {'TP+PP GB':>8} " + " ".join(f"{'loss ' + n:>12}" for n in names)
          + " (MB)")
    for r in rows[:args.top]:
        p = r.plan
        print(f"{p.tp:>3} {p.pp:>3} {p.vp or '-':>3} {p.dp:>4} {p.micro_batch:>3} {p.num_microbatches:>4} "
              f"{'y' if p.recompute else 'n':>3} {'y' if p.distributed_optimizer else 'n':>4} "
              f"{r.memory / GIB:8.1f} {r.step_s:7.2f} {r.model_mfu:5.2f} {r.dp_bytes / GB:7.2f} "
              f"{r.tp_pp_bytes / GB:8.1f} "
              + " ".join(f"{r.loss_bytes[n] / 1e6:12.1f}" for n in names))
    if rows:
        best = rows[0].plan
        print(f"fits={len(rows)} best_tp={best.tp} best_pp={best.pp} best_vp={best.vp} best_dp={best.dp} "
              f"best_micro_batch={best.micro_batch} best_step_s={rows[0].step_s:.3f} "
              f"best_memory_gib={rows[0].memory / GIB:.1f}")
    else:
        print("fits=0")


if __name__ == "__main__":
    main()
