"""Start torch.distributed from torchrun's or Slurm's environment, then Megatron-Core's groups.

    groups = initialize(cfg.parallel)      # every rank, once, before building the model

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under `srun` with one task
per process, Slurm sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the node list; the first node
of SLURM_JOB_NODELIST becomes the master unless MASTER_ADDR is set. A plain `python` run is a world
of one.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from m2megatron.config.base import ConfigError
from m2megatron.config.parallel import ParallelConfig
from m2megatron.parallel import cpu_compat, rng
from m2megatron.parallel.device import choose_device
from m2megatron.parallel.groups import ParallelGroups, build_groups, process_device
from m2megatron.parallel.layout import Layout


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str
    """Where the values came from: torchrun, slurm or single."""


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
                     master_port=port if "MASTER_PORT" in env else _free_port(), source="single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend: nccl needs CUDA, which is not available on this machine")
    return requested


def init_process_group(cfg: ParallelConfig, env: LaunchEnv | None = None) -> LaunchEnv:
    """Initialise the default process group (idempotent)."""
    env = env or read_launch_env()
    if dist.is_initialized():
        return env
    backend = pick_backend(cfg.backend)
    device = choose_device(backend, env.local_rank)  # set_device before NCCL starts: each rank on its own GPU
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=cfg.timeout_s),
        # Binds NCCL to this rank's GPU (barriers and object collectives use it, no device guessing).
        device_id=device if device.type == "cuda" else None,
    )
    return env


def initialize(cfg: ParallelConfig, env: LaunchEnv | None = None, *,
               device: torch.device | str | None = None) -> ParallelGroups:
    """Process group, CPU workarounds (CPU only) and Megatron-Core model-parallel state.

    The groups carry the runtime device: cuda:LOCAL_RANK under NCCL, else the CPU. `device` overrides it
    (the tests' stand-in accelerator, or `meta` for a dry run).
    """
    env = init_process_group(cfg, env)
    device = torch.device(device) if device is not None else process_device()
    cpu_compat.apply(device)
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
    from m2megatron.parallel.groups import _release_owned_groups

    _release_owned_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
