"""Rank r of an N-rank world in one process: torch's `fake` process-group backend, where every collective is
a no-op, with the `meta` device as the runtime device. What a dry run of a full-scale layout needs (and the
tests' stand-in accelerator): Megatron's groups, the stages, DDP and the optimizer are built for real, as
shapes only.
"""

from __future__ import annotations

import torch

META = torch.device("meta")


def join_fake_world(rank: int, world_size: int, device: torch.device = META) -> None:
    """(Re)join a fake world as `rank` of `world_size`, `device` its runtime device (through the bootstrap)."""
    from m2megatron.parallel.bootstrap import fake_world_env, initialize, shutdown

    shutdown()
    initialize(env=fake_world_env(rank, world_size), device=device, megatron_state=False)
