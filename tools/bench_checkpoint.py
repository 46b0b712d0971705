#!/usr/bin/env python
"""Benchmark: the blocking time of one save of our distributed checkpoint vs torch.save of the same tensors.

Builds the real M2Encoder of --preset (default m2-0.4b) on --ranks local gloo ranks (CPU, fp32; several ranks
are data-parallel replicas, so Megatron's fully parallel save gives each 1/ranks of the writing), optionally
with Adam state, then times in the same run (rank 0's clock, every rank between barriers):
  torch   torch.save(state_dict) of the same tensors (one file, one process) and torch.load(weights_only=True);
  ours    a sync save (torch_dist + each rank's CRCs of its own files + manifest + atomic publish): all of it
          blocks training;
          an async save: the blocking part (planning + the fork of the writer), and the publishing poll()
          after the writer is done (Megatron's metadata, manifest from the writers' CRCs, rename, pruning of
          the previous checkpoint; no shard is re-read); and, for comparison, the CRC of the rank's shards in
          the training process, which that poll() did before the writer took it over;
          load_checkpoint with and without the CRC pass (each file read once, by one rank).
Prints seconds, MB/s and the ratios ours/torch. Not a test; numbers go to docs/CHECKPOINTS.md.

  python tools/bench_checkpoint.py [--out SCRATCH] [--result FILE.json] [--preset m2-0.4b] [--optimizer]
      [--ranks 2] [--repeat 2]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn):
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - started


def _publish_time(ckpt) -> float:
    """Wait until the background writer is done, then time the poll() that publishes the checkpoint."""
    while True:
        writer = ckpt._queue.async_calls[0].async_caller.thread if ckpt._queue.async_calls else None
        if writer is None or not writer.is_alive():
            break
        time.sleep(0.05)
    started = time.perf_counter()
    while not ckpt.poll():  # collective; returns the published step once every rank's writer is done
        time.sleep(0.01)
    return time.perf_counter() - started


def _crc_own_shards(root: Path) -> None:
    """What an async save's publishing poll() did in the training process before the writer took it over:
    the CRC of this rank's shards."""
    import torch.distributed as dist

    from m2megatron.checkpoint.atomic import resolve
    from m2megatron.checkpoint.safety import describe_files

    path = resolve(root)
    describe_files(path, [p.name for p in path.glob(f"__{dist.get_rank()}_*.distcp")])


def _state_tensors(chunks, opt) -> dict:
    import torch

    tensors = {k: v for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}
    if opt is not None:
        inner = opt.chained_optimizers[0].optimizer
        for i, st in enumerate(inner.state.values()):
            tensors.update({f"opt.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return tensors


def _bench(out: str, preset: str, with_optimizer: bool, repeat: int, result_file: str):
    import torch
    import torch.distributed as dist

    from m2megatron.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
    from m2megatron.checkpoint.optimizer_state import ensure_state
    from m2megatron.checkpoint.reshard import build_m2_from_config
    from m2megatron.config import load_config
    from m2megatron.parallel import Layout, build_groups, seed_everything

    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(out)
    root.parent.mkdir(parents=True, exist_ok=True)
    groups = build_groups(Layout(world_size=world))
    seed_everything(0, groups)
    cfg = load_config(preset_name=preset)
    t0 = time.perf_counter()
    chunks, opt, sched = build_m2_from_config(cfg.to_dict(), groups)
    build_s = time.perf_counter() - t0
    if with_optimizer:
        ensure_state(opt)  # Adam moments allocated as after a first step
    else:
        opt = sched = None
    tensors = _state_tensors(chunks, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    torch_file = root.parent / "torch_bench.pt"
    rows = {k: [] for k in ("torch_save", "torch_load", "ours_save", "ours_async_blocking", "ours_async_publish",
                            "crc_in_process", "ours_load_verify", "ours_load")}
    for i in range(repeat):
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        rows["torch_save"].append(_timed(lambda: torch.save(tensors, torch_file) if rank == 0 else None))
        rows["torch_load"].append(_timed(lambda: torch.load(torch_file, weights_only=True) if rank == 0 else None))
        step = i + 1
        rows["ours_save"].append(_timed(lambda: save_checkpoint(root, step, chunks, opt, sched,  # noqa: B023
                                                                groups=groups, config=cfg, keep_last=1)))
        rows["crc_in_process"].append(_timed(lambda: _crc_own_shards(root)))
        rows["ours_load_verify"].append(_timed(lambda: load_checkpoint(root, chunks, opt, sched, groups=groups)))
        rows["ours_load"].append(_timed(lambda: load_checkpoint(root, chunks, opt, sched, groups=groups,
                                                                verify=False)))
        ckpt = Checkpointer(root, groups, keep_last=1, async_save=True)
        rows["ours_async_blocking"].append(_timed(lambda: ckpt.save(100 + step, chunks, opt, sched,  # noqa: B023
                                                                    config=cfg)))
        rows["ours_async_publish"].append(_publish_time(ckpt))
    if rank != 0:
        return
    os.remove(torch_file)
    best = {k: min(v) for k, v in rows.items()}
    result = {"preset": preset, "ranks": world, "with_optimizer": with_optimizer, "bytes": nbytes,
              "tensors": len(tensors), "build_s": round(build_s, 1),
              "best_seconds": {k: round(v, 2) for k, v in best.items()},
              "MB_per_s": {k: round(nbytes / 1e6 / v, 1) for k, v in best.items() if not k.startswith("ours_async")},
              "ratio_save_blocking_ours_over_torch": round(best["ours_save"] / best["torch_save"], 2),
              "ratio_async_blocking_ours_over_torch": round(best["ours_async_blocking"] / best["torch_save"], 3),
              "ratio_load_ours_over_torch": round(best["ours_load"] / best["torch_load"], 2),
              "ratio_load_verify_ours_over_torch": round(best["ours_load_verify"] / best["torch_load"], 2),
              "all_seconds": rows}
    Path(result_file).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=1), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="scratch directory for the checkpoints (deleted first; default: a new "
                                              "temporary directory, removed afterwards)")
    p.add_argument("--preset", default="m2-0.4b", help="model preset (default m2-0.4b)")
    p.add_argument("--optimizer", action="store_true", help="include Adam state (3x the bytes)")
    p.add_argument("--ranks", type=int, default=1, help="data-parallel replicas (local gloo ranks)")
    p.add_argument("--repeat", type=int, default=2, help="repetitions; the best time counts")
    p.add_argument("--result", default=None, help="also write the JSON result (with every repetition's seconds) here")
    args = p.parse_args(argv)
    from m2megatron.parallel.local_ranks import run_on_ranks

    with tempfile.TemporaryDirectory(prefix="bench_checkpoint-") as scratch:
        out = args.out or str(Path(scratch) / "ckpt")
        result = args.result or str(Path(scratch) / "bench_checkpoint.json")
        run_on_ranks(args.ranks, _bench, out, args.preset, args.optimizer, args.repeat, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
