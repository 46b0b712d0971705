"""The one runtime device of a process, and the one place where batches move to it.

    device = choose_device(backend, local_rank)   # at bootstrap, before the process group starts
    batch = to_device(batch, groups.device)        # host batch → device (pinned + non_blocking on CUDA)

On a GPU host the device is `cuda:LOCAL_RANK` (and `torch.cuda.set_device` is called before NCCL starts,
so NCCL, object collectives and Megatron's `torch.cuda.current_device()` all agree on it). Elsewhere it
is the CPU. Tests stand in for an accelerator with the `meta` device, which no CPU tensor can silently
mix with (tests/standin.py).
"""

from __future__ import annotations

import os

import torch

_STAND_IN: torch.device | None = None


def use_stand_in_accelerator(device: torch.device | str | None) -> None:
    """Tests only: on a host without CUDA, make `device` (e.g. `meta`) this process's runtime device, so that
    anything left on the CPU by accident cannot silently mix with it. None switches back to the CPU."""
    global _STAND_IN
    _STAND_IN = torch.device(device) if device is not None else None


def host_device() -> torch.device:
    """The runtime device of a process without NCCL: the CPU, or the tests' stand-in accelerator."""
    return _STAND_IN if _STAND_IN is not None else torch.device("cpu")


def choose_device(backend: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for NCCL (after set_device), else the CPU."""
    if backend == "nccl":
        # Megatron's TP/SP communication overlap needs kernels queued in issue order (Megatron-LM's launch
        # scripts set it too); it must be set before the CUDA context exists. A user's own value wins.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return host_device()


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
