"""Exact count of live tensor bytes on CPU, where torch has no `max_memory_allocated`.

    with LiveTensorBytes() as tracker:     # enter BEFORE the model is built
        ...build, train one step...
        tracker.reset_peak()               # peak of what follows, on top of what is live now
        ...one more step...
    tracker.peak, tracker.live

A TorchDispatchMode sees the output of every ATen op (factory calls, results, gradients in backward,
optimizer states, collective output buffers). Each new storage is counted once with its byte size and
uncounted by a weakref finalizer when it is freed, so views and in-place ops cost nothing. What it does
not see: tensors created before it was entered, buffers private to an op (a matmul's scratch space,
gloo's send/receive buffers) and allocator overheads. That is the "live tensor bytes" quantity the
memory planner predicts; CUDA's `max_memory_allocated` counts the same tensors plus allocator rounding.
(tools/bench_loss.py measures transient loss memory with the profiler's allocator events instead,
relative to the step's start; here the absolute footprint including weights is needed.)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self, *, meta: bool = False):
        super().__init__()
        self.meta = meta
        """Count meta-device storages (a dry run's shape-only tensors) instead of real ones."""
        self.live = 0
        """Bytes of tensor storages created inside the mode and still alive."""
        self.peak = 0
        """Highest `live` since entering (or since the last `reset_peak`)."""
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if (storage.device.type == "meta") != self.meta or storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        weakref.finalize(storage, self._free, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out
