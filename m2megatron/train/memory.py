"""This rank's memory at a log interval: GPU allocated, reserved and peak (Megatron's caching allocator
counters), and the process's resident set on the host."""

from __future__ import annotations

import psutil
import torch

GB = 2**30
MEMORY_KEYS = ("mem/allocated_gb", "mem/reserved_gb", "mem/peak_gb", "mem/cpu_rss_gb")
"""In this order `memory_sample` returns them (the GPU ones are 0 without CUDA)."""


def memory_sample(device: torch.device) -> list[float]:
    """[allocated, reserved, peak since the last sample, host resident set] in GiB; resets the GPU peak."""
    rss = psutil.Process().memory_info().rss / GB
    if torch.device(device).type != "cuda":
        return [0.0, 0.0, 0.0, rss]
    values = [torch.cuda.memory_allocated(device) / GB, torch.cuda.memory_reserved(device) / GB,
              torch.cuda.max_memory_allocated(device) / GB, rss]
    torch.cuda.reset_peak_memory_stats(device)
    return values
