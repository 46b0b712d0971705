#!/usr/bin/env python
"""Training-step time of one setting against another, measured in the same run, alternating rounds.

    python tools/bench_train_step.py                      # both parts, defaults below
    python tools/bench_train_step.py --part precision --shape m2-0.4b-d2 --batch 8

- precision: one process, the stage runtime's training step (DDP, Megatron Adam, contrastive loss) with
  train.precision=fp32 against bf16 (Megatron-native: bf16 weights, fp32 main grads and weights).
- overlap: --world ranks on gloo (data parallel), parallel.overlap_grad_reduce off against on, small
  buckets so the reduction really is split.
Each prints the median step time of both and the ratio `ratio_<part>=other/reference`. Times on a shared
2-core machine move between runs; the alternating rounds keep the two settings under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SHAPES = {
    "tiny": [],
    "m2-0.4b-d2": ["--model.preset=m2-0.4b", "--model.hidden_size=768", "--model.num_attention_heads=12",
                   "--model.ffn_hidden_size=3072", "--model.num_layers=2", "--model.num_vl_layers=1",
                   "--model.image_size=224", "--model.patch_size=16", "--model.embed_dim=768",
                   "--model.vocab_size=4096", "--model.max_text_len=52"],
}


def _groups(world: int):
    from m2megatron.parallel import Layout, build_groups, seed_everything

    groups = build_groups(Layout(world_size=world))
    seed_everything(0, groups)
    return groups


def _stages(overrides: list[str], groups):
    """(config, stages, step) of one setting; every setting shares the groups (a new layout frees the old)."""
    from m2megatron.config import load_config
    from m2megatron.runtime import ContrastiveStep, build_stages

    cfg = load_config(overrides=overrides)
    stages = build_stages(cfg, groups)
    return cfg, stages, ContrastiveStep(stages)


def _step_time(cfg, stages, step, batches) -> float:
    start = time.perf_counter()
    for chunk in stages.chunks:
        chunk.zero_grad_buffer()
    stages.optimizer.zero_grad()
    step(batches)
    stages.optimizer.step()
    return time.perf_counter() - start


def _alternate(runs: dict, rounds: int, steps: int) -> dict[str, float]:
    """{name: median seconds per step}, the settings taking turns round by round."""
    import torch.distributed as dist

    from m2megatron.planning.measure import synthetic_microbatches

    times = {name: [] for name in runs}
    batches = {name: synthetic_microbatches(cfg, 1) for name, (cfg, _, _) in runs.items()}
    for name, run in runs.items():  # warm-up: Adam allocates its state on the first step
        _step_time(*run, batches[name])
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(steps):
                if dist.is_initialized():
                    dist.barrier()
                times[name].append(_step_time(*run, batches[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def precision_part(args) -> dict:
    import torch.distributed as dist

    from m2megatron.parallel.bootstrap import initialize, local_rank_env

    initialize(env=local_rank_env(0, 1, store=dist.HashStore()), megatron_state=False)
    base = SHAPES[args.shape] + [f"--train.micro_batch_size={args.batch}"]
    groups = _groups(1)
    runs = {p: _stages(base + [f"--train.precision={p}"], groups) for p in ("fp32", "bf16")}
    medians = _alternate(runs, args.rounds, args.steps)
    return {"fp32_s": medians["fp32"], "bf16_s": medians["bf16"], "ratio_precision": medians["bf16"] / medians["fp32"]}


def _overlap_worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from m2megatron.config import ParallelConfig
    from m2megatron.parallel.bootstrap import initialize, local_rank_env

    initialize(ParallelConfig(timeout_s=600), local_rank_env(rank, world, port=port), megatron_state=False)
    base = SHAPES[args.shape] + [f"--train.micro_batch_size={args.batch}", "--parallel.bucket_size_mb=1"]
    groups = _groups(world)
    runs = {"none": _stages(base, groups),
            "overlap": _stages(base + ["--parallel.overlap_grad_reduce=true"], groups)}
    medians = _alternate(runs, args.rounds, args.steps)
    if rank == 0:
        Path(out).write_text(json.dumps(medians))
    dist.destroy_process_group()


def overlap_part(args) -> dict:
    import torch.multiprocessing as mp

    from m2megatron.parallel.bootstrap import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "overlap.json")
        mp.start_processes(_overlap_worker, args=(args.world, port, args, out), nprocs=args.world,
                           start_method="spawn")
        medians = json.loads(Path(out).read_text())
    return {"no_overlap_s": medians["none"], "overlap_s": medians["overlap"],
            "ratio_overlap": medians["overlap"] / medians["none"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["precision", "overlap", "both"], default="both")
    p.add_argument("--shape", choices=sorted(SHAPES), default="m2-0.4b-d2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--world", type=int, default=2, help="gloo ranks of the overlap part")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per setting per round")
    args = p.parse_args(argv)
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "kernels")]
    print(f"# shape {args.shape}, microbatch {args.batch}, {args.rounds} rounds × {args.steps} steps, "
          f"{os.cpu_count()} CPUs")
    results = {}
    if args.part in ("overlap", "both"):
        results.update(overlap_part(args))
        print(f"overlap (DP={args.world}, gloo): none {results['no_overlap_s'] * 1e3:.0f} ms/step, "
              f"overlap_grad_reduce {results['overlap_s'] * 1e3:.0f} ms/step")
    if args.part in ("precision", "both"):
        results.update(precision_part(args))
        print(f"precision (1 process): fp32 {results['fp32_s'] * 1e3:.0f} ms/step, "
              f"bf16 {results['bf16_s'] * 1e3:.0f} ms/step")
    print(" ".join(f"{k}={v:.3f}" for k, v in results.items() if k.startswith("ratio_")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
