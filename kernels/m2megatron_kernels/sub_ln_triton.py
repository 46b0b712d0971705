"""The TP-sharded Sub-LN (m2megatron.models.sub_ln.TPLayerNorm) as Triton kernels: two passes around each
all-reduce instead of about ten eager fp32 ops, and no fp32 copy of the input kept for backward.

The input x [N, C] holds this rank's C columns of every row; the LayerNorm is over all TP ranks' columns
(full_size of them). Per row, in fp32:
- forward: pass 1 `row_stats` → [Σx, Σx²]; the caller all-reduces them over the TP group; pass 2 `normalize`
  → y = (x − μ)·r·w + b in x's dtype, with μ = Σx/n, r = 1/√(max(Σx²/n − μ², 0) + ε) (the eager formula), and
  keeps μ, r (8 bytes per row) for backward;
- backward, with x̂ = (x − μ)·r and g = ∂y·w: pass 1 `grad_row_sums` → [Σg, Σg·x̂]; the caller all-reduces
  them; pass 2 `grad_input` → ∂x = r·(g − Σg/n − x̂·Σg·x̂/n); `grad_params` reduces ∂w = Σ_rows ∂y·x̂ and
  ∂b = Σ_rows ∂y per (column block, split of the rows), then over the few splits (no atomics: deterministic).
TRITON_INTERPRET must be set before this module is imported for the kernels to run on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_C = 16 if INTERPRETED else 1024  # columns per iteration of a row program
BLOCK_R, BLOCK_P = (16, 16) if INTERPRETED else (32, 128)  # rows × columns per step of grad_params
MAX_SPLITS = 2 if INTERPRETED else 32  # grad_params splits the rows too, so that enough programs run


@triton.jit
def _row_stats(x_ptr, stats_ptr, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc, acc_sq = tl.zeros((BLOCK,), tl.float32), tl.zeros((BLOCK,), tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * C + cols, mask=cols < C, other=0.0).to(tl.float32)
        acc += x
        acc_sq += x * x
    tl.store(stats_ptr + 2 * row, tl.sum(acc, 0))
    tl.store(stats_ptr + 2 * row + 1, tl.sum(acc_sq, 0))


@triton.jit
def _normalize(x_ptr, w_ptr, b_ptr, y_ptr, stats_ptr, mean_ptr, rstd_ptr, C, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    mean = tl.load(stats_ptr + 2 * row) / n
    var = tl.maximum(tl.load(stats_ptr + 2 * row + 1) / n - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        tl.store(y_ptr + row * C + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _g_and_x_hat(dy_ptr, x_ptr, w_ptr, row, cols, C, mean, rstd):
    """g = ∂y·w and x̂ = (x − μ)·r of one row's columns, in fp32 (0 outside the row)."""
    mask = cols < C
    g = tl.load(dy_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32) * \
        tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x_hat = (tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    return g, x_hat


@triton.jit
def _grad_row_sums(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, sums_ptr, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    mean, rstd = tl.load(mean_ptr + row), tl.load(rstd_ptr + row)
    acc_g, acc_gx = tl.zeros((BLOCK,), tl.float32), tl.zeros((BLOCK,), tl.float32)
    for start in range(0, C, BLOCK):
        g, x_hat = _g_and_x_hat(dy_ptr, x_ptr, w_ptr, row, start + tl.arange(0, BLOCK), C, mean, rstd)
        acc_g += g
        acc_gx += g * x_hat
    tl.store(sums_ptr + 2 * row, tl.sum(acc_g, 0))
    tl.store(sums_ptr + 2 * row + 1, tl.sum(acc_gx, 0))


@triton.jit
def _grad_input(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, sums_ptr, dx_ptr, C, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    mean, rstd = tl.load(mean_ptr + row), tl.load(rstd_ptr + row)
    mean_g, mean_gx = tl.load(sums_ptr + 2 * row) / n, tl.load(sums_ptr + 2 * row + 1) / n
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        g, x_hat = _g_and_x_hat(dy_ptr, x_ptr, w_ptr, row, cols, C, mean, rstd)
        dx = rstd * (g - mean_g - x_hat * mean_gx)
        tl.store(dx_ptr + row * C + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < C)


@triton.jit
def _grad_params(dy_ptr, x_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, N, C, rows_per_split,
                 BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partial ∂w, ∂b of one column block over one split of the rows, into row `split` of [splits, C]."""
    cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    split = tl.program_id(1)
    col_mask = cols < C
    acc_w, acc_b = tl.zeros((BLOCK_P,), tl.float32), tl.zeros((BLOCK_P,), tl.float32)
    end = tl.minimum(N, (split + 1) * rows_per_split)
    for start in range(split * rows_per_split, end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < end) & col_mask[None, :]
        offsets = rows[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rows < end, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < end, other=0.0)
        acc_w += tl.sum(dy * (x - mean[:, None]) * rstd[:, None], 0)
        acc_b += tl.sum(dy, 0)
    tl.store(dw_ptr + split * C + cols, acc_w, mask=col_mask)
    tl.store(db_ptr + split * C + cols, acc_b, mask=col_mask)


def row_stats(x: Tensor) -> Tensor:
    """[N, 2] fp32 per-row [Σx, Σx²] of a contiguous [N, C] x."""
    stats = torch.empty(x.shape[0], 2, dtype=torch.float32, device=x.device)
    _row_stats[(x.shape[0],)](x, stats, x.shape[1], BLOCK=BLOCK_C)
    return stats


def normalize(x: Tensor, weight: Tensor, bias: Tensor, stats: Tensor, full_size: int,
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y in x's dtype, μ, r) from the all-reduced [N, 2] stats."""
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _normalize[(x.shape[0],)](x, weight, bias, y, stats, mean, rstd, x.shape[1], float(full_size), eps, BLOCK=BLOCK_C)
    return y, mean, rstd


def grad_row_sums(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """[N, 2] fp32 per-row [Σg, Σg·x̂] (g = ∂y·w) of this rank's columns."""
    sums = torch.empty(x.shape[0], 2, dtype=torch.float32, device=x.device)
    _grad_row_sums[(x.shape[0],)](dy, x, weight, mean, rstd, sums, x.shape[1], BLOCK=BLOCK_C)
    return sums


def grad_input(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, sums: Tensor,
               full_size: int) -> Tensor:
    """∂x in x's dtype from the all-reduced [N, 2] sums."""
    dx = torch.empty_like(x)
    _grad_input[(x.shape[0],)](dy, x, weight, mean, rstd, sums, dx, x.shape[1], float(full_size), BLOCK=BLOCK_C)
    return dx


def grad_params(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(∂w, ∂b) in fp32: sums over the rows (per split of the rows, then over the splits: deterministic)."""
    n, c = x.shape
    splits = max(1, min(MAX_SPLITS, triton.cdiv(n, BLOCK_R)))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), BLOCK_R) * BLOCK_R
    splits = triton.cdiv(n, rows_per_split) if n else 1
    dw = torch.zeros(splits, c, dtype=torch.float32, device=x.device)
    db = torch.zeros_like(dw)
    _grad_params[(triton.cdiv(c, BLOCK_P), splits)](dy, x, mean, rstd, dw, db, n, c, rows_per_split,
                                                    BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P)
    return dw.sum(0), db.sum(0)
