"""Q1 of m2megatron.compat: the queue Megatron's checkpoint writer reports through, forked early, deaf to
preemption signals.

Megatron-Core's `FileSystemWriterAsync` sends each save's write results through a multiprocessing
Manager queue that it creates at a process's first save, with the `spawn` start method. Two problems:

- A spawned interpreter re-imports the entry point's main module (`python -m m2megatron.train` → torch
  and Megatron-Core): 5–8 s of CPU per rank at the first checkpoint, and a second full interpreter per
  rank for the rest of the job. Forked, the server costs milliseconds, but a process must not be forked
  once it runs other threads (gloo/NCCL, the autograd engine) or holds a CUDA context: a Manager forked
  later from a threaded rank once died at its first `put`. So the bootstrap (m2megatron.parallel) starts
  it before the process group and before any CUDA call, and Megatron finds it made.
- The server is a process of the job step, so SIGUSR1/SIGTERM sent to every process of the step
  (Slurm preemption, `scancel --signal`, the time limit) kill it — just before the preemption checkpoint
  needs it. Ours ignores those signals and instead dies with its rank (Linux parent-death signal), so it
  never outlives the job either.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.managers
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_IGNORED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
_manager: multiprocessing.managers.SyncManager | None = None


def _serve_through_preemption(rank_pid: int) -> None:
    """Initializer of the server process: ignore the job's stop signals, but die with the rank."""
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != rank_pid:  # the rank died before prctl took effect
        os._exit(0)


def start_before_process_groups() -> bool:
    """Start the writer's result queue by fork. Returns False, leaving Megatron to spawn its own, when it is
    too late to fork safely (process groups up, CUDA initialised) or a queue exists already."""
    global _manager
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or dist.is_initialized() or torch.cuda.is_initialized():
        return False
    _manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("fork"))
    _manager.start(_serve_through_preemption, (os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()
    return True


def server_pid() -> int | None:
    """The server's process id (tests), or None when Megatron's own queue is in use."""
    return _manager._process.pid if _manager is not None else None
