"""Autograd wrapper of the tiled contrastive cross-entropy: O(m · tile) memory instead of O(m · n).

Per local row i (image→text and text→image) against all gathered columns (positive at column
row_offset + i), the label-smoothed cross-entropy of z = scale · rows · colsᵀ. Forward keeps only
the rows and columns (alive anyway), the scalar scale and four [m] vectors (row max, log row sum per
direction); backward recomputes the logits tile by tile and writes the columns' gradient straight
into one [n, 2, d] buffer, the layout the gather's reduce-scatter takes.
The arithmetic lives in m2megatron_kernels: plain PyTorch (`tiled_ce_reference`: CPU and fallback)
or Triton (`tiled_ce_triton`: CUDA), chosen by LossConfig.kernel.
Formulas and numerics: kernels/m2megatron_kernels/tiled_ce_reference.py.
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


class _TiledClipCrossEntropy(torch.autograd.Function):
    """Both directions at once, so backward writes ∂L/∂columns straight into one [n, 2, d] buffer."""

    @staticmethod
    def forward(ctx, image_rows: Tensor, text_rows: Tensor, pairs: Tensor, scale: Tensor, row_offset: int,
                smoothing: float, tile: int, impl: ModuleType) -> Tensor:
        image_cols, text_cols = pairs.unbind(dim=1)  # [n, d] views
        i2t, i2t_max, i2t_log_sum = impl.ce_forward(image_rows, text_cols, scale, row_offset, smoothing, tile)
        t2i, t2i_max, t2i_log_sum = impl.ce_forward(text_rows, image_cols, scale, row_offset, smoothing, tile)
        ctx.save_for_backward(image_rows, text_rows, pairs, scale, i2t_max, i2t_log_sum, t2i_max, t2i_log_sum)
        ctx.args = (row_offset, smoothing, tile, impl)
        return torch.stack([i2t, t2i])  # [2, m]

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        image_rows, text_rows, pairs, scale, i2t_max, i2t_log_sum, t2i_max, t2i_log_sum = ctx.saved_tensors
        row_offset, smoothing, tile, impl = ctx.args
        grad_pairs = torch.empty_like(pairs)  # [n, 2, d]
        image_cols, text_cols = pairs.unbind(dim=1)
        grad_image, _, grad_scale_i2t = impl.ce_backward(image_rows, text_cols, scale, row_offset, smoothing, i2t_max,
                                                         i2t_log_sum, grad_loss[0].contiguous(), tile,
                                                         grad_k_out=grad_pairs[:, 1])
        grad_text, _, grad_scale_t2i = impl.ce_backward(text_rows, image_cols, scale, row_offset, smoothing, t2i_max,
                                                        t2i_log_sum, grad_loss[1].contiguous(), tile,
                                                        grad_k_out=grad_pairs[:, 0])
        return grad_image, grad_text, grad_pairs, grad_scale_i2t + grad_scale_t2i, None, None, None, None


def tiled_clip_cross_entropy(image_rows: Tensor, text_rows: Tensor, pairs: Tensor, scale: Tensor, *,
                             row_offset: int, label_smoothing: float = 0.0, tile: int,
                             kernel: str = "auto") -> Tensor:
    """Per-row losses [2, m] (i2t, t2i; fp32) of cross_entropy(scale · rows · colsᵀ, row_offset + arange(m), ε).

    image_rows, text_rows [m, d]: the local rows; pairs [n, 2, d]: all columns, image then text
    (the gathered tensor). Any float dtype, upcast per tile; scale a 0-d tensor; differentiable in all.
    `tile` is the column tile of the torch path (the Triton path sizes its own tiles).
    """
    if pairs.dim() != 3 or pairs.shape[1] != 2 or not 0 <= row_offset <= pairs.shape[0] - image_rows.shape[0]:
        raise ValueError(f"tiled cross-entropy: positives {row_offset}…{row_offset + image_rows.shape[0] - 1} "
                         f"fall outside the columns {tuple(pairs.shape)} (expected [n, 2, d])")
    impl = resolve_kernel(kernel, image_rows.device)
    return _TiledClipCrossEntropy.apply(image_rows, text_rows, pairs, scale, row_offset, label_smoothing, tile, impl)
