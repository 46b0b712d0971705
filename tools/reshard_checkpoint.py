#!/usr/bin/env python
"""Reshard a checkpoint offline: load it at a new TP/PP/DP layout and save it there.

Runs on --world-size local gloo ranks that it spawns itself, or under torchrun (then --world-size must
match). Every rank rebuilds the model from the saved config (the stage runtime), loads its
slices (resharding on load) and writes them, so per-rank memory is about one shard of model+optimizer.

  python tools/reshard_checkpoint.py runs/a/checkpoints runs/b/checkpoints --world-size 4 --tp 2 --pp 2
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory, or a root with a 'latest' pointer")
    p.add_argument("dst", help="root to write the resharded checkpoint into (iter_NNNNNNN + latest)")
    p.add_argument("--world-size", type=int, required=True, help="ranks of the target layout")
    p.add_argument("--tp", type=int, default=1, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    p.add_argument("--no-optimizer", action="store_true", help="write model weights (and counters) only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from m2megatron.checkpoint.cli import run_on_ranks
    from m2megatron.checkpoint.reshard import reshard_on_this_rank

    run_on_ranks(args.world_size, reshard_on_this_rank, args.src, args.dst, args.tp, args.pp, not args.no_optimizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
