"""The explicit bundle of process groups that the rest of the code receives as arguments.

Only this package reads Megatron-Core's global `parallel_state`; models, losses, data and the
trainer get a `ParallelGroups` (and through it a Megatron `ProcessGroupCollection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from m2megatron.parallel.layout import Layout


@dataclass(kw_only=True)
class ParallelGroups:
    layout: Layout
    """The TP/PP/DP layout these groups realise."""
    rank: int
    """This process's global rank."""
    tp: dist.ProcessGroup
    """Tensor-parallel group of this rank."""
    pp: dist.ProcessGroup
    """Pipeline-parallel group of this rank."""
    dp: dist.ProcessGroup
    """Data-parallel group of this rank (gradient reduction)."""
    loss: dist.ProcessGroup
    """Contrastive-loss group: G consecutive DP ranks of this rank's DP group."""
    collection: ProcessGroupCollection = field(repr=False)
    """Megatron-Core's collection of the same groups, for its layers, DDP and optimizer."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The runtime device (m2megatron.parallel.device): every tensor of the model, its batches and every
    tensor handed to torch.distributed lives here."""

    @property
    def tp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[2]

    @property
    def loss_rank(self) -> int:
        return self.dp_rank % self.layout.group_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pipeline_parallel - 1


def new_loss_groups(layout: Layout, rank: int, timeout=None) -> dist.ProcessGroup:
    """Create every loss group (all ranks must call this, in the same order) and return ours."""
    mine = None
    for ranks in layout.loss_groups():
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    assert mine is not None, f"rank {rank} is in no loss group of {layout}"
    return mine


def process_device() -> torch.device:
    """The runtime device the default process group was started for: the current CUDA device under NCCL (set
    by the bootstrap before the group started), a stand-in device named in its backend (the fake world's
    `cpu:fake,meta:fake`), else the CPU."""
    if not dist.is_initialized():
        return torch.device("cpu")
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    types = [entry.split(":")[0] for entry in dist.get_backend_config().split(",")]
    stand_in = [t for t in types if t not in ("cpu", "cuda")]
    return torch.device(stand_in[0]) if stand_in else torch.device("cpu")


_OWNED_GROUPS: list[dist.ProcessGroup] = []
"""Process groups created by the last `build_groups`: destroyed by the next one."""


def release_groups() -> None:
    """Destroy the previous layout's groups. Megatron's destroy_model_parallel only forgets them, and
    every gloo group keeps its threads and sockets: a process that re-lays itself out many times (the
    test pools do, once per test) would otherwise pile up thousands of threads."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    while _OWNED_GROUPS:
        group = _OWNED_GROUPS.pop()
        if group in dist.distributed_c10d._world.pg_map:
            dist.destroy_process_group(group)


def build_groups(layout: Layout, timeout=None, device: torch.device | str | None = None) -> ParallelGroups:
    """Initialise Megatron-Core's model-parallel state for `layout` and collect the groups.

    `device` is the runtime device the groups carry (default: `process_device()`).
    """
    rank = dist.get_rank()
    release_groups()
    before = set(dist.distributed_c10d._world.pg_map)
    kwargs = {"distributed_timeout_minutes": max(1, int(timeout.total_seconds() // 60))} if timeout else {}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        create_gloo_process_groups=False,
        **kwargs,
    )
    collection = ProcessGroupCollection.use_mpu_process_groups()
    groups = ParallelGroups(
        layout=layout,
        rank=rank,
        tp=collection.tp,
        pp=collection.pp,
        dp=collection.dp,
        loss=new_loss_groups(layout, rank, timeout),
        collection=collection,
        device=torch.device(device) if device is not None else process_device(),
    )
    default = dist.distributed_c10d._get_default_group()
    _OWNED_GROUPS.extend(g for g in dist.distributed_c10d._world.pg_map if g not in before and g is not default)
    return groups
