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
import os
import re
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from m2megatron import compat
from m2megatron.config.base import ConfigError
from m2megatron.config.parallel import ParallelConfig
from m2megatron.parallel import rng
from m2megatron.parallel.device import choose_device
from m2megatron.parallel.groups import ParallelGroups, build_groups, process_device, release_groups
from m2megatron.parallel.layout import Layout

log = logging.getLogger(__name__)
_MADE_HERE = ("local", "fake", "shape")
"""LaunchEnv sources that a caller makes (not read from a launcher's environment)."""


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str
    """Where the values came from: torchrun, slurm or single (read_launch_env); local, fake or shape (made here)."""
    store: dist.Store | None = field(default=None, compare=False, repr=False)
    """A rendezvous store the caller holds (the tests' pools), instead of MASTER_ADDR:MASTER_PORT."""


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as 'gpu[003-005,009],cpu1' → 'gpu003'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                         local_rank=int(env.get("LOCAL_RANK", 0)),
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port, source="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000  # same on every task, differs per job
        return LaunchEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                         local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=addr,
                         master_port=port, source="slurm")
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                     master_port=port if "MASTER_PORT" in env else free_port(), source="single")


def local_rank_env(rank: int, world_size: int, *, port: int | None = None,
                   store: dist.Store | None = None) -> LaunchEnv:
    """Rank `rank` of `world_size` gloo ranks on this host (runtime device: the CPU, whatever GPUs it has),
    meeting at 127.0.0.1:`port` or through `store`."""
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=rank, master_addr="127.0.0.1",
                     master_port=port or 0, source="local", store=store)


def fake_world_env(rank: int, world_size: int) -> LaunchEnv:
    """Rank `rank` of a `world_size` world on torch's `fake` backend (a dry run; the tests' stand-in device)."""
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=0, master_addr="", master_port=0, source="fake")


def shape_world_env() -> LaunchEnv:
    """A gloo world of one on an in-process store: what Megatron's layers need to be built for their shapes."""
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="", master_port=0, source="shape")


def free_port() -> int:
    """A TCP port that is free now on 127.0.0.1 (the one helper for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(requested: str, device: torch.device | None = None) -> str:
    """nccl for a CUDA runtime device, gloo for any other; `auto` without a device: nccl where CUDA exists."""
    if device is not None:
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend: nccl needs CUDA, which is not available on this machine")
    return requested


def _join_process_group(cfg: ParallelConfig, env: LaunchEnv, device: torch.device | None) -> torch.device:
    """Start the default process group as `env` says; returns the runtime device."""
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
