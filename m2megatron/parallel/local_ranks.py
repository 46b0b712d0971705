"""Run a function on every rank of a world: in this process under torchrun or srun (NCCL on a GPU host, each
rank on its own GPU), else on N local gloo ranks spawned here, on the CPU also on a host with CUDA (what the
checkpoint tools and the checkpoint benchmark use).

    run_on_ranks(world_size, fn, *args)   # fn(*args) on every rank, after the bootstrap

The calling script needs an `if __name__ == "__main__":` guard (spawn re-imports it). `fn` lays out
Megatron's groups itself (m2megatron.parallel.build_groups).
"""

from __future__ import annotations

import os

from m2megatron.config.parallel import ParallelConfig
from m2megatron.parallel.bootstrap import LaunchEnv, free_port, initialize, local_rank_env, read_launch_env, shutdown

TIMEOUT_S = 1800
"""Collective timeout of the tools' ranks: a rank may read or write a large checkpoint alone for minutes."""


def run_as(env: LaunchEnv, fn, args: tuple) -> None:
    """Bring this process up as `env` says (process group and patches, no layout), run fn(*args), shut down."""
    initialize(ParallelConfig(timeout_s=TIMEOUT_S), env, megatron_state=False)
    try:
        fn(*args)
    finally:
        shutdown()


def _spawned_rank(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    run_as(local_rank_env(rank, world_size, port=port), fn, args)


def run_on_ranks(world_size: int, fn, *args) -> None:
    """fn(*args) on every rank of a `world_size` world (module docstring)."""
    env = read_launch_env()
    if env.source != "single":
        if env.world_size != world_size:
            raise SystemExit(f"--world-size {world_size} but the launcher started {env.world_size} ranks")
        run_as(env, fn, args)
        return
    import torch.multiprocessing as mp

    mp.start_processes(_spawned_rank, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       start_method="spawn")
