"""Autograd wrapper of the tiled contrastive cross-entropy: O(m · tile) memory instead of O(m · n).

Per row i of q [m, d] against all columns k [n, d] (positive at column row_offset + i), the
label-smoothed cross-entropy of z = scale · q kᵀ. Forward keeps only q, k (alive anyway: the
local rows and the gathered columns), the scalar scale and two [m] vectors (row max, log row sum);
backward recomputes the logits tile by tile. The arithmetic lives in m2megatron_kernels: plain
PyTorch (`tiled_ce_reference`: CPU and fallback) or Triton (`tiled_ce_triton`: CUDA), chosen by
LossConfig.kernel. Formulas and numerics: kernels/m2megatron_kernels/tiled_ce_reference.py.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch
from m2megatron_kernels import tiled_ce_reference
from torch import Tensor


@functools.cache
def _triton_module() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from m2megatron_kernels import tiled_ce_triton  # lazily: defining the kernels needs triton

    return tiled_ce_triton


def resolve_kernel(kernel: str, device: torch.device) -> ModuleType:
    """The implementation module for LossConfig.kernel ("auto" | "torch" | "triton") on `device`.

    auto: Triton on CUDA tensors when triton is importable, else torch. Triton also runs CPU tensors
    under TRITON_INTERPRET=1 (tests only).
    """
    if kernel == "torch":
        return tiled_ce_reference
    if kernel not in ("auto", "triton"):
        raise ValueError(f"loss.kernel: {kernel!r} is not one of ['auto', 'torch', 'triton']")
    runnable = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    module = _triton_module() if runnable else None
    if module is not None:
        return module
    if kernel == "triton":
        raise ValueError(f"loss.kernel: 'triton' needs the triton package and CUDA tensors (got device {device}, "
                         f"triton {'present' if _triton_module() else 'missing'}); use 'auto' or 'torch'")
    return tiled_ce_reference


class _TiledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, row_offset: int, smoothing: float, tile: int,
                impl: ModuleType) -> Tensor:
        loss, row_max, log_sum = impl.ce_forward(q, k, scale, row_offset, smoothing, tile)
        ctx.save_for_backward(q, k, scale, row_max, log_sum)
        ctx.args = (row_offset, smoothing, tile, impl)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        q, k, scale, row_max, log_sum = ctx.saved_tensors
        row_offset, smoothing, tile, impl = ctx.args
        grads = impl.ce_backward(q, k, scale, row_offset, smoothing, row_max, log_sum, grad_loss.contiguous(), tile)
        return (*grads, None, None, None, None)


def tiled_cross_entropy(q: Tensor, k: Tensor, scale: Tensor, *, row_offset: int, label_smoothing: float = 0.0,
                        tile: int, kernel: str = "auto") -> Tensor:
    """Per-row loss [m] (fp32) of cross_entropy(scale · q kᵀ, row_offset + arange(m), label_smoothing).

    q [m, d], k [n, d] (any float dtype, upcast per tile), scale a 0-d tensor; differentiable in all three.
    `tile` is the column tile of the torch path (the Triton path sizes its own tiles).
    """
    if not 0 <= row_offset <= k.shape[0] - q.shape[0]:
        raise ValueError(f"tiled cross-entropy: positives {row_offset}…{row_offset + q.shape[0] - 1} fall outside "
                         f"the {k.shape[0]} columns")
    return _TiledCrossEntropy.apply(q, k, scale, row_offset, label_smoothing, tile, resolve_kernel(kernel, q.device))
