"""`python -m m2megatron.train [--config RECIPE.yaml] [--preset NAME] [--section.field=value ...]`

Runs under torchrun (one process per rank), under `srun` with one task per rank, or as a plain
single process. Writes the resolved config, metrics.jsonl, TensorBoard events and checkpoints into
train.run_dir, resumes from its latest checkpoint (checkpoint.load=auto), and with train.eval_at_end
evaluates zero-shot retrieval on the held-out synthetic set into results.json.
"""

from __future__ import annotations

import argparse
import logging
import sys

from m2megatron.cli import run_main
from m2megatron.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2megatron.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--preset", help="model preset: tiny, m2-0.4b, m2-1b, m2-10b")
    dry = parser.add_argument_group("dry run (one CPU process, no GPU; docs/SLURM.md 'Before you submit')")
    dry.add_argument("--dry-run", action="store_true",
                     help="build a rank of the layout on the meta device under a fake process group and check it")
    dry.add_argument("--world-size", type=int, help="N of the dry run (default: launch.nodes × launch.procs_per_node)")
    which = dry.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, help="the rank to build (default 0)")
    which.add_argument("--all-ranks", action="store_true", help="every distinct rank class; exit 1 on any problem")
    dry.add_argument("--gpu-memory-gib", type=float, help="GPU memory for the check (default launch.gpu_memory_gib)")
    dry.add_argument("--no-data-check", action="store_true",
                     help="skip the checks of shards, tokenizer and eval sets (a machine that cannot see the data)")
    args, overrides = parser.parse_known_args(argv)
    if args.dry_run:
        return _dry_run(args, overrides)
    from m2megatron.parallel.launch_env import read_launch_env  # no torch import yet

    # What needs no process group is checked before one starts (and before torch and Megatron-Core are
    # imported): every rank finds the same error, and rank 0 reports it (m2megatron.cli.run_main).
    env = read_launch_env()
    cfg = load_config(args.config, overrides, preset_name=args.preset).validate(world_size=env.world_size)
    _check_inputs(cfg)
    # One voice: rank 0 logs progress, the other ranks only warnings and errors.
    level = logging.INFO if env.rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter

    import torch.distributed as dist

    from m2megatron.parallel import shutdown
    from m2megatron.train.run import train_and_evaluate

    try:
        train_and_evaluate(cfg)
    finally:
        if dist.is_initialized():
            shutdown()
    return 0


def _check_inputs(cfg) -> None:
    """Input files named by the config that every rank can check alone (ConfigError naming the setting)."""
    if cfg.data.source == "webdataset":
        from m2megatron.data.formats import expand_shards

        expand_shards(cfg.data.shards)  # a pattern that matches no file


def _dry_run(args, overrides: list[str]) -> int:
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # shapes only: never touch a GPU a login node may have
    # torch's fake backend warns once per process group when the next visited rank tears the groups down.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from m2megatron.train.dry_run import run_dry

    cfg = load_config(args.config, overrides, preset_name=args.preset).validate()
    world = args.world_size or cfg.launch.world_size()
    return run_dry(cfg, world, rank=args.rank, all_ranks=args.all_ranks, gpu_memory_gib=args.gpu_memory_gib,
                   check_data=not args.no_data_check)


def cli() -> None:
    run_main(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
