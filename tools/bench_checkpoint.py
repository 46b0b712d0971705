#!/usr/bin/env python
"""Benchmark: save/load throughput of our distributed checkpoint vs torch.save/torch.load of the same tensors.

Builds the real M2Encoder of --preset (default m2-0.4b) on one gloo rank (CPU, fp32), optionally with
Adam state, then times in the same run:
  ours   save_checkpoint (sync; Megatron torch_dist + manifest CRCs + atomic publish),
         the blocking part of an async save, load_checkpoint (with and without CRC verification),
  torch  torch.save(state_dict) and torch.load(weights_only=True) of the same tensors.
Prints MB/s and the ratios ours/torch. Not a test; numbers go to docs/CHECKPOINTS.md.

  python tools/bench_checkpoint.py --out /tmp/ckbench [--preset m2-0.4b] [--optimizer] [--repeat 2]
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _bench(out: str, preset: str, with_optimizer: bool, repeat: int, result_file: str):
    import torch

    from m2megatron.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
    from m2megatron.checkpoint.reshard import build_m2_from_config
    from m2megatron.config import load_config
    from m2megatron.parallel import Layout, build_groups, seed_everything

    root = Path(out)
    root.parent.mkdir(parents=True, exist_ok=True)
    groups = build_groups(Layout(world_size=1))
    seed_everything(0, groups)
    cfg = load_config(preset_name=preset)
    t0 = time.perf_counter()
    chunks, opt, sched = build_m2_from_config(cfg.to_dict(), groups)
    build_s = time.perf_counter() - t0
    if with_optimizer:
        from m2megatron.checkpoint.optimizer_state import ensure_state

        ensure_state(opt)  # Adam moments allocated as after a first step
    else:
        opt = sched = None
    tensors = {k: v for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}
    if opt is not None:
        inner = opt.chained_optimizers[0].optimizer
        for i, st in enumerate(inner.state.values()):
            tensors.update({f"opt.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rows = {"ours_save": [], "ours_async_blocking": [], "ours_load_verify": [], "ours_load": [],
            "torch_save": [], "torch_load": []}
    for i in range(repeat):
        shutil.rmtree(root, ignore_errors=True)
        rows["torch_save"].append(_timed(lambda: torch.save(tensors, root.parent / "torch_bench.pt")))
        rows["torch_load"].append(_timed(lambda: torch.load(root.parent / "torch_bench.pt", weights_only=True)))
        step = i + 1
        rows["ours_save"].append(_timed(lambda: save_checkpoint(root, step, chunks, opt, sched,  # noqa: B023
                                                                groups=groups, config=cfg, keep_last=1)))
        rows["ours_load_verify"].append(_timed(lambda: load_checkpoint(root, chunks, opt, sched, groups=groups)))
        rows["ours_load"].append(_timed(lambda: load_checkpoint(root, chunks, opt, sched, groups=groups,
                                                                verify=False)))
        ckpt = Checkpointer(root, groups, keep_last=1, async_save=True)
        rows["ours_async_blocking"].append(_timed(lambda: ckpt.save(100 + step, chunks, opt, sched,  # noqa: B023
                                                                    config=cfg)))
        ckpt.wait()
    os.remove(root.parent / "torch_bench.pt")
    best = {k: min(v) for k, v in rows.items()}
    result = {"preset": preset, "with_optimizer": with_optimizer, "bytes": nbytes, "tensors": len(tensors),
              "build_s": round(build_s, 1), "best_seconds": {k: round(v, 2) for k, v in best.items()},
              "MB_per_s": {k: round(nbytes / 1e6 / v, 1) for k, v in best.items()},
              "ratio_save_ours_over_torch": round(best["ours_save"] / best["torch_save"], 2),
              "ratio_load_ours_over_torch": round(best["ours_load"] / best["torch_load"], 2),
              "ratio_load_verify_ours_over_torch": round(best["ours_load_verify"] / best["torch_load"], 2),
              "all_seconds": rows}
    Path(result_file).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=1), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="scratch directory for the checkpoints (deleted first)")
    p.add_argument("--preset", default="m2-0.4b", help="model preset (default m2-0.4b)")
    p.add_argument("--optimizer", action="store_true", help="include Adam state (3x the bytes)")
    p.add_argument("--repeat", type=int, default=2, help="repetitions; the best time counts")
    p.add_argument("--result", default=None, help="write the JSON result here (default OUT/../bench.json)")
    args = p.parse_args(argv)
    from m2megatron.checkpoint.cli import run_on_ranks

    result = args.result or str(Path(args.out).parent / "bench_checkpoint.json")
    run_on_ranks(1, _bench, args.out, args.preset, args.optimizer, args.repeat, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
