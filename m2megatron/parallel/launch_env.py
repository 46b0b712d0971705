"""Where a process comes from: torchrun's, Slurm's or a plain run's environment, or a world its caller makes.
Light (no torch import), so that an entry point can check its config against the world size before it
imports torch and Megatron-Core.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from m2megatron.config.base import ConfigError

if TYPE_CHECKING:
    import torch.distributed as dist


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
