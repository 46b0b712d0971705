"""Rank r of an N-rank world in one process: torch's `fake` process-group backend, where every collective is
a no-op, with the `meta` device as the runtime device. What a dry run of a full-scale layout needs (and the
tests' stand-in accelerator): Megatron's groups, the stages, DDP and the optimizer are built for real, as
shapes only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

META = torch.device("meta")


def join_fake_world(rank: int, world_size: int, device: torch.device = META) -> None:
    """(Re)join a fake world as `rank` of `world_size`; `device` becomes the runtime device (CPU hosts)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from m2megatron.parallel import cpu_compat
    from m2megatron.parallel.device import use_stand_in_accelerator
    from m2megatron.parallel.groups import _release_owned_groups

    if dist.is_initialized():
        _release_owned_groups()
        dist.destroy_process_group()
    use_stand_in_accelerator(device)
    cpu_compat.apply(device)
    dist.init_process_group(f"cpu:fake,{device.type}:fake", store=FakeStore(), rank=rank, world_size=world_size)
