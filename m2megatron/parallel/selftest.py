"""`torchrun --nproc-per-node N -m m2megatron.parallel.selftest [overrides]`: bring up the groups of a
layout and print each rank's (tp, dp, pp) coordinates and a check all-reduce. A launcher smoke test."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from m2megatron.cli import run_main
from m2megatron.config import load_config
from m2megatron.parallel import initialize, shutdown


def main() -> int:
    cfg = load_config(overrides=sys.argv[1:])
    groups = initialize(cfg.parallel)
    cfg.validate(world_size=dist.get_world_size())
    total = torch.ones(1, device=groups.device)
    dist.all_reduce(total)
    print(f"rank {groups.rank}/{dist.get_world_size()}: tp={groups.tp_rank} dp={groups.dp_rank} "
          f"pp={groups.pp_rank} loss_group_rank={groups.loss_rank} all_reduce={int(total.item())}", flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
