"""`python -m m2megatron.checkpoint.reshard SRC DST --tp T --pp P [--vp V] [--world-size N] [--no-optimizer]`

Reshard a checkpoint offline: load it at a new TP/PP/DP layout and save it there (docs/CHECKPOINTS.md).
Under torchrun or srun (the Slurm reshard job, `python -m m2megatron.launch.submit --kind reshard`) the
ranks are the launcher's: one per GPU on a GPU host, NCCL, each on its own device. Started as a plain
process it spawns --world-size local gloo ranks itself (default TP × PP: one data-parallel replica).
Every rank rebuilds the model from the saved config
(the stage runtime), loads its slices (resharding on load) and writes them, so per-rank memory is about
one shard of model and optimizer.

  python -m m2megatron.checkpoint.reshard runs/a/checkpoints runs/b/checkpoints --world-size 4 --tp 2 --pp 2
"""

from __future__ import annotations

import logging
import sys

from m2megatron.cli import run_main


def main(argv: list[str] | None = None) -> int:
    from m2megatron.checkpoint.reshard import argument_parser

    args = argument_parser(__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from m2megatron.checkpoint.reshard import build_m2_from_config, reshard_on_this_rank
    from m2megatron.parallel.bootstrap import read_launch_env
    from m2megatron.parallel.local_ranks import run_on_ranks

    env = read_launch_env()
    world_size = args.world_size
    if env.source != "single":
        world_size = world_size or env.world_size
    elif world_size is None:
        world_size = args.tp * args.pp  # one data-parallel replica: the fewest ranks that hold the target layout
        logging.info("--world-size not given: %d local ranks (TP %d × PP %d, one data-parallel replica)",
                     world_size, args.tp, args.pp)
    run_on_ranks(world_size, reshard_on_this_rank, args.src, args.dst, args.tp, args.pp, not args.no_optimizer,
                 build_m2_from_config, args.vp)
    return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
