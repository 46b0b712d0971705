"""The one function that brings a process up: `initialize`. Every entry point, tool and test pool calls it;
no other module starts a process group (tests/unit/test_layering.py checks it).

    groups = initialize(cfg.parallel)      # every rank, once, before building the model

In this order: (1) the checkpoint writer's result queue is forked (m2megatron.compat Q1: before any process
group and any CUDA call), (2) the runtime device is chosen (cuda:LOCAL_RANK under NCCL, set before NCCL
starts; else the CPU, or the `device=` a caller names), (3) the default process group starts, (4) the CPU
compatibility patches are applied when the runtime device is not CUDA (m2megatron.compat W1–W8),
(5) Megatron-Core's parallel state and our loss groups are built for `cfg`'s layout.

Where the process comes from (`env`, a LaunchEnv): torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT), Slurm's `srun` with one task per process (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the first
node of SLURM_JOB_NODELIST as master unless MASTER_ADDR is set), a plain `python` run (a world of one), or
made by the caller: `local_rank_env` (rank r of N local gloo ranks on the CPU, also on a CUDA host: the
checkpoint tools, benchmarks and the tests' pools), `fake_world_env` (torch's `fake` backend, every collective a
no-op: the dry run and the tests' stand-in device) and `shape_world_env` (a world of one for counting shapes).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from m2megatron import compat
from m2megatron.config.base import ConfigError
from m2megatron.config.parallel import ParallelConfig
from m2megatron.parallel import rng
from m2megatron.parallel.device import choose_device
from m2megatron.parallel.groups import ParallelGroups, build_groups, process_device, release_groups
from m2megatron.parallel.launch_env import (  # noqa: F401 - the bootstrap's public names
    LaunchEnv,
    fake_world_env,
    first_host,
    free_port,
    local_rank_env,
    read_launch_env,
    shape_world_env,
)
from m2megatron.parallel.layout import Layout

log = logging.getLogger(__name__)
_JOINED = False
"""Whether this process has started a process group (m2megatron.cli tells errors before and after apart)."""


def pick_backend(requested: str, device: torch.device | None = None) -> str:
    """nccl for a CUDA runtime device, gloo for any other; `auto` without a device: nccl where CUDA exists."""
    if device is not None:
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend: nccl needs CUDA, which is not available on this machine")
    return requested


def joined() -> bool:
    """True once this process has started a process group (also after it was shut down again)."""
    return _JOINED


def _join_process_group(cfg: ParallelConfig, env: LaunchEnv, device: torch.device | None) -> torch.device:
    """Start the default process group as `env` says; returns the runtime device."""
    global _JOINED
    _JOINED = True
    if env.source == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        device = device or torch.device("meta")
        # The runtime device is part of the backend string: process_device() reads it back.
        dist.init_process_group(f"cpu:fake,{device.type}:fake", store=FakeStore(), rank=env.rank,
                                world_size=env.world_size)
        return device
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if env.source == "shape":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return torch.device("cpu")
    if env.source == "local":
        device = device or torch.device("cpu")
    backend = pick_backend(cfg.backend, device)
    device = choose_device(backend, env.local_rank, device, tensor_parallel=cfg.tensor_parallel)
    where = {"store": env.store} if env.store is not None else {
        "init_method": f"tcp://{env.master_addr}:{env.master_port}"}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            # Binds NCCL to this rank's GPU (barriers and object collectives use it).
                            device_id=device if device.type == "cuda" else None, **where)
    return device


def initialize(cfg: ParallelConfig | None = None, env: LaunchEnv | None = None, *,
               device: torch.device | str | None = None, megatron_state: bool = True) -> ParallelGroups | None:
    """Bring this process up (the steps and worlds of the module docstring) and return its groups.

    `env`: where the process comes from (default: the launcher's environment). `device`: the runtime device,
    instead of the one the backend implies (the CLIP_benchmark adapter's, the tests' stand-in). With
    `megatron_state=False` only the process group and the patches are set up (the caller lays out Megatron's
    groups itself: the checkpoint tools and the tests' pools); None is returned. When the process group runs
    already, only the layout is (re)built, on the process's runtime device.
    """
    cfg = cfg or ParallelConfig()
    env = env or read_launch_env()
    device = torch.device(device) if device is not None else None
    if dist.is_initialized():
        device = device or process_device()
    else:
        if env.source not in ("fake", "shape"):
            compat.start_writer_queue()  # no thread, no CUDA context yet: fork, not spawn
        device = _join_process_group(cfg, env, device)
    if env.source != "shape":
        compat.apply(device)  # W1–W8, when the runtime device is not CUDA
    if not megatron_state:
        return None
    layout = Layout(world_size=dist.get_world_size(), tensor_parallel=cfg.tensor_parallel,
                    pipeline_parallel=cfg.pipeline_parallel, loss_group_size=cfg.loss_group_size,
                    virtual_pipeline=cfg.virtual_pipeline)
    return build_groups(layout, timeout=datetime.timedelta(seconds=cfg.timeout_s), device=device)


def seed_everything(seed: int, groups: ParallelGroups, *, step: int = 0) -> int:
    """Seed this rank's random streams as Megatron-LM does (m2megatron.parallel.rng): per-rank seeds, distinct
    across DP replicas and PP stages, the same on the TP ranks of a replica, and the TP-distinct tracker.

    `step` > 0 re-derives the streams of a run continuing at that step whose saved streams cannot be
    restored (a resume at another layout). Returns the rank seed.
    """
    return rng.seed_rank(seed, tp_rank=groups.tp_rank, pp_rank=groups.pp_rank, dp_rank=groups.dp_rank, step=step)


def shutdown() -> None:
    release_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
