"""The README's main job on the built-in tiny default.

Until the trainer lands this resolves and validates the tiny TP=2 × PP=2 layout on 4 ranks, starts
the 4 gloo processes, builds Megatron-Core's groups and prints each rank's coordinates.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from m2megatron.cli import run_main
from m2megatron.config import load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(overrides=["--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2"])
    cfg.validate(world_size=args.nproc)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           "-m", "m2megatron.parallel.selftest", "--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2"]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    run_main(main)
