"""Shared pieces of the checkpoint tools: running a function on N local gloo ranks (or under torchrun / srun)."""

from __future__ import annotations

import datetime
import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    from m2megatron.checkpoint import writer_results

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    writer_results.start_before_process_groups()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30))
    try:
        _apply_cpu_compat()
        fn(*args)
    finally:
        dist.destroy_process_group()


def _apply_cpu_compat() -> None:
    import torch

    if not torch.cuda.is_available():
        from m2megatron.parallel import cpu_compat

        cpu_compat.apply()


def run_on_ranks(world_size: int, fn, *args) -> None:
    """Run fn(*args) on every rank: in this process under torchrun or srun (NCCL on a GPU host, each rank on
    its own GPU), else on `world_size` spawned local gloo ranks.

    The calling script needs an `if __name__ == "__main__":` guard (spawn re-imports it).
    """
    from m2megatron.parallel.bootstrap import read_launch_env

    env = read_launch_env()
    if env.source != "single":
        import torch.distributed as dist

        from m2megatron.checkpoint import writer_results
        from m2megatron.config.parallel import ParallelConfig
        from m2megatron.parallel.bootstrap import init_process_group

        if env.world_size != world_size:
            raise SystemExit(f"--world-size {world_size} but the launcher started {env.world_size} ranks")
        writer_results.start_before_process_groups()
        init_process_group(ParallelConfig(timeout_s=1800), env)  # set_device before NCCL starts
        _apply_cpu_compat()
        try:
            fn(*args)
        finally:
            dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(world_size, _free_port(), fn, args), nprocs=world_size,
                       start_method="spawn")
