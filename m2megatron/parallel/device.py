"""The one runtime device of a process, and the one place where batches move to it.

    device = choose_device(backend, local_rank)   # at bootstrap, before the process group starts
    batch = to_device(batch, groups.device)        # host batch → device (pinned + non_blocking on CUDA)

On a GPU host the device is `cuda:LOCAL_RANK` (and `torch.cuda.set_device` is called before NCCL starts,
so NCCL, object collectives and Megatron's `torch.cuda.current_device()` all agree on it). Elsewhere it
is the CPU, or what the bootstrap's caller names (tests stand in for an accelerator with the `meta` device,
which no CPU tensor can silently mix with: tests/standin.py).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def choose_device(backend: str, local_rank: int, requested: torch.device | None = None, *,
                  tensor_parallel: int = 1) -> torch.device:
    """The runtime device: under NCCL `requested` (a CUDA device) or cuda:LOCAL_RANK, made current before NCCL
    starts; else `requested` or the CPU."""
    if backend != "nccl":
        return requested or torch.device("cpu")
    if tensor_parallel > 1:
        _one_device_connection()
    index = requested.index if requested is not None and requested.index is not None else \
        local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _one_device_connection() -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 before the CUDA context exists: Megatron's tensor-parallel layers overlap
    their all-reduce (or sequence-parallel gather) with the next GEMM and rely on kernels running in issue
    order. Only TP > 1 needs it. A user's own value is kept, and said so."""
    current = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if current is None:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    elif current != "1":
        log.warning("CUDA_DEVICE_MAX_CONNECTIONS=%s kept as set; Megatron's tensor-parallel overlap expects 1",
                    current)


def is_accelerator(device: torch.device) -> bool:
    """True for any device that is not the host (CUDA, or the tests' stand-in)."""
    return torch.device(device).type != "cpu"


def to_device(batch: dict, device: torch.device) -> dict:
    """A copy of `batch` with every tensor on `device`; other values (keys, captions, indices) unchanged.

    Host tensors bound for CUDA are pinned first so the copy can be asynchronous (`non_blocking`); the
    compute stream waits for it before any kernel reads the tensor.
    """
    device = torch.device(device)
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            if device.type == "cuda" and value.device.type == "cpu":
                value = value.pin_memory() if not value.is_pinned() else value
                value = value.to(device, non_blocking=True)
            else:
                value = value.to(device)
        out[name] = value
    return out
