"""Fused tiled contrastive cross-entropy (forward and backward) as Triton kernels.

Same contract, formulas and numerics as tiled_ce_reference.py, its plain-PyTorch twin and test
reference: per-row label-smoothed cross-entropy of z = scale · q kᵀ (q [m, d], k [n, d]) with the
positive of row i at column row_offset + i, never materialising the [m, n] logits.

Layout of the work (m, the local rows, is small — b or A·b — while n = G·b·A is large):
- forward: grid (row blocks, column splits). Each program streams its column range in BLOCK_N tiles,
  keeping a running max and running sum of exponentials per row (online log-sum-exp), the positive
  logit and the row sum of logits; torch folds the [splits, m] partials.
- backward of q (and scale): grid (row blocks, d slices, column splits); recomputes each logits tile,
  forms ∂L/∂z = g (p − y) and accumulates ∂L/∂z · k[:, slice]; the splits are summed in torch.
- backward of k: grid (column blocks, d slices); loops over all rows, accumulating (∂L/∂z)ᵀ · q.
A d-slice program recomputes its logits tile over the full d, so backward does about 2·d/BLOCK_D
times the forward's matmul work; at the sizes of this loss that is well below the model's step.

Precision: every load is upcast to fp32 and every accumulation is fp32. `tl.dot` runs in "ieee"
precision for fp32 inputs (parity with the reference) and "tf32" for bf16/fp16 inputs, which loses
nothing on the inputs (a bf16 mantissa fits in tf32). The upcast also sidesteps the interpreter's
broken bf16 arithmetic (TRITON_INTERPRET=1 stores bf16 as raw uint16).
TRITON_INTERPRET must be set before this module is imported for the kernels to run on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from m2megatron_kernels.tiled_ce_reference import loss_from_stats

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tl.dot needs every block dimension >= 16; the interpreter is slow, so it gets the smallest blocks.
BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_D=16) if INTERPRETED else \
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=128)
TARGET_PROGRAMS = 4 if INTERPRETED else 512


@triton.jit
def _logits_tile(q_ptr, k_ptr, rows, cols, m, n, d, stride_q, stride_k, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """scale · q[rows] · k[cols]ᵀ as an fp32 [BLOCK_M, BLOCK_N] tile (out-of-range entries are 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        qt = tl.load(q_ptr + rows[:, None] * stride_q + ks[None, :],
                     mask=(rows[:, None] < m) & (ks[None, :] < d), other=0.0).to(tl.float32)
        kt = tl.load(k_ptr + cols[:, None] * stride_k + ks[None, :],
                     mask=(cols[:, None] < n) & (ks[None, :] < d), other=0.0).to(tl.float32)
        acc += tl.dot(qt, tl.trans(kt), input_precision=PRECISION)
    return acc * scale


@triton.jit
def _grad_logits(z, rows, cols, m, valid_cols, max_ptr, logsum_ptr, g_ptr, row_offset, smoothing, uniform):
    """∂L/∂z = g (p − (1 − ε)[col = pos] − ε/n) for a tile (uniform = ε/n); 0 outside the valid rows and columns."""
    row_max = tl.load(max_ptr + rows, mask=rows < m, other=0.0)
    log_sum = tl.load(logsum_ptr + rows, mask=rows < m, other=0.0)
    g = tl.load(g_ptr + rows, mask=rows < m, other=0.0)  # 0 on padded rows
    p = tl.exp((z - row_max[:, None]) - log_sum[:, None]) - uniform
    p = tl.where(cols[None, :] == rows[:, None] + row_offset, p - (1.0 - smoothing), p)
    return tl.where(valid_cols[None, :], p * g[:, None], 0.0)


@triton.jit
def _ce_fwd_kernel(q_ptr, k_ptr, scale_ptr, max_ptr, sum_ptr, pos_ptr, zsum_ptr, m, n, d, stride_q, stride_k,
                   cols_per_split, row_offset,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, n)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        z = _logits_tile(q_ptr, k_ptr, rows, cols, m, n, d, stride_q, stride_k, scale,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        valid = cols[None, :] < end
        z_sum += tl.sum(tl.where(valid, z, 0.0), axis=1)
        z_pos += tl.sum(tl.where(valid & (cols[None, :] == rows[:, None] + row_offset), z, 0.0), axis=1)
        z = tl.where(valid, z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    out = pid_s * m + rows
    tl.store(max_ptr + out, run_max, mask=rows < m)
    tl.store(sum_ptr + out, run_sum, mask=rows < m)
    tl.store(pos_ptr + out, z_pos, mask=rows < m)
    tl.store(zsum_ptr + out, z_sum, mask=rows < m)


@triton.jit
def _ce_bwd_rows_kernel(q_ptr, k_ptr, scale_ptr, max_ptr, logsum_ptr, g_ptr, out_ptr, gscale_ptr,
                        m, n, d, stride_q, stride_k, cols_per_split, row_offset, smoothing, uniform,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """out[split, i, slice] = Σ_{j in split} ∂L/∂z_ij k_j[slice]; gscale[split, i] = Σ_j ∂L/∂z_ij z_ij."""
    pid_m, pid_d, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, n)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    grad_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        z = _logits_tile(q_ptr, k_ptr, rows, cols, m, n, d, stride_q, stride_k, scale,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        grad_z = _grad_logits(z, rows, cols, m, cols < end, max_ptr, logsum_ptr, g_ptr, row_offset, smoothing,
                              uniform)
        grad_scale += tl.sum(grad_z * z, axis=1)
        kv = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :],
                     mask=(cols[:, None] < end) & (dims[None, :] < d), other=0.0).to(tl.float32)
        acc += tl.dot(grad_z, kv, input_precision=PRECISION)
    out = out_ptr + pid_s * m * d + rows[:, None] * d + dims[None, :]
    tl.store(out, acc, mask=(rows[:, None] < m) & (dims[None, :] < d))
    tl.store(gscale_ptr + pid_s * m + rows, grad_scale, mask=(rows < m) & (pid_d == 0))


@triton.jit
def _ce_bwd_cols_kernel(q_ptr, k_ptr, scale_ptr, max_ptr, logsum_ptr, g_ptr, out_ptr,
                        m, n, d, stride_q, stride_k, stride_out, row_offset, smoothing, uniform,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """out[j, slice] = scale · Σ_i ∂L/∂z_ij q_i[slice], stored in out's dtype."""
    pid_n, pid_d = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, m, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        z = _logits_tile(q_ptr, k_ptr, rows, cols, m, n, d, stride_q, stride_k, scale,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        grad_z = _grad_logits(z, rows, cols, m, cols < n, max_ptr, logsum_ptr, g_ptr, row_offset, smoothing,
                              uniform)
        qv = tl.load(q_ptr + rows[:, None] * stride_q + dims[None, :],
                     mask=(rows[:, None] < m) & (dims[None, :] < d), other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(grad_z), qv, input_precision=PRECISION)
    out = out_ptr + cols[:, None] * stride_out + dims[None, :]
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=(cols[:, None] < n) & (dims[None, :] < d))


def _precision(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _column_splits(m: int, n: int, tile: int | None, programs_per_split: int) -> tuple[int, int]:
    """(number of column splits, columns per split).

    With `tile` None: enough splits that programs_per_split × splits fills the device, but at most
    n / m of them, so the backward's [splits, m, d] partial sums never outgrow ∂L/∂k [n, d].
    """
    block_n = BLOCKS["BLOCK_N"]
    num_tiles = triton.cdiv(n, block_n)
    if tile is not None:
        tiles_per_split = max(1, triton.cdiv(tile, block_n))
    else:
        wanted = max(1, min(num_tiles, TARGET_PROGRAMS // programs_per_split, triton.cdiv(n, m)))
        tiles_per_split = triton.cdiv(num_tiles, wanted)
    cols_per_split = tiles_per_split * block_n
    return triton.cdiv(n, cols_per_split), cols_per_split


def _prepare(q: Tensor, k: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows may be strided (a slice of a gathered [n, 2, d] tensor); the last dim must be dense."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"tiled ce: expected q [m, d] and k [n, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    q = q if q.stride(1) == 1 else q.contiguous()
    k = k if k.stride(1) == 1 else k.contiguous()
    return q, k, scale.detach().float().reshape(1)


def ce_forward_stats(q: Tensor, k: Tensor, scale: Tensor, row_offset: int,
                     tile: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_max, row_sum, z_pos, z_sum), each [m] fp32: the reference's `ce_forward_stats` contract."""
    q, k, scale32 = _prepare(q, k, scale)
    (m, d), n = q.shape, k.shape[0]
    num_splits, cols_per_split = _column_splits(m, n, tile, triton.cdiv(m, BLOCKS["BLOCK_M"]))
    parts = torch.empty((4, num_splits, m), dtype=torch.float32, device=q.device)  # max, sum, z_pos, z_sum
    grid = (triton.cdiv(m, BLOCKS["BLOCK_M"]), num_splits)
    _ce_fwd_kernel[grid](q, k, scale32, parts[0], parts[1], parts[2], parts[3], m, n, d, q.stride(0), k.stride(0),
                         cols_per_split, row_offset,
                         BLOCKS["BLOCK_M"], BLOCKS["BLOCK_N"], BLOCKS["BLOCK_K"], _precision(q))
    run_max, run_sum = parts[0], parts[1]
    row_max = run_max.max(dim=0).values  # fold the splits: [splits, m] → [m]
    row_sum = (run_sum * torch.exp(run_max - row_max)).sum(dim=0)
    return row_max, row_sum, parts[2].sum(dim=0), parts[3].sum(dim=0)


def ce_forward(q: Tensor, k: Tensor, scale: Tensor, row_offset: int, label_smoothing: float,
               tile: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ, row_max, log_sum), each [m] fp32. `tile`: columns per program (None: sized to fill the device)."""
    stats = ce_forward_stats(q, k, scale, row_offset, tile)
    return loss_from_stats(*stats, k.shape[0], label_smoothing)


def ce_backward(q: Tensor, k: Tensor, scale: Tensor, row_offset: int, label_smoothing: float, row_max: Tensor,
                log_sum: Tensor, grad_loss: Tensor, tile: int | None = None, grad_k_out: Tensor | None = None,
                total_columns: int | None = None, row_grads: bool = True,
                col_grads: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(∂L/∂q, ∂L/∂k, ∂L/∂scale) given g = ∂L/∂ℓ; ∂L/∂k goes into `grad_k_out` when given; `total_columns`:
    the n of the ε/n term when k is one block of the columns; row_grads / col_grads launch only the rows
    kernel (∂q, ∂scale) / the columns kernel (∂k), the other outputs come back None (see the reference)."""
    q, k, scale32 = _prepare(q, k, scale)
    (m, d), n = q.shape, k.shape[0]
    b = BLOCKS
    uniform = label_smoothing / (total_columns or n)
    row_max, log_sum, g = row_max.contiguous(), log_sum.contiguous(), grad_loss.float().contiguous()
    grad_q = grad_k = grad_scale = None
    if row_grads:
        programs = triton.cdiv(m, b["BLOCK_M"]) * triton.cdiv(d, b["BLOCK_D"])
        num_splits, cols_per_split = _column_splits(m, n, tile, programs)
        partial = torch.empty((num_splits, m, d), dtype=torch.float32, device=q.device)
        partial_scale = torch.empty((num_splits, m), dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(m, b["BLOCK_M"]), triton.cdiv(d, b["BLOCK_D"]), num_splits)
        _ce_bwd_rows_kernel[grid](q, k, scale32, row_max, log_sum, g, partial, partial_scale, m, n, d, q.stride(0),
                                  k.stride(0), cols_per_split, row_offset, label_smoothing, uniform,
                                  b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], b["BLOCK_D"], _precision(q))
        grad_q = (scale32 * partial.sum(dim=0)).to(q.dtype)  # [m, d]
        grad_scale = (partial_scale.sum() / scale32).reshape(scale.shape).to(scale.dtype)
    if col_grads:
        grad_k = torch.empty((n, d), dtype=k.dtype, device=q.device) if grad_k_out is None else grad_k_out
        if grad_k.stride(1) != 1:
            raise ValueError("tiled ce: grad_k_out must have a dense last dimension")
        grid = (triton.cdiv(n, b["BLOCK_N"]), triton.cdiv(d, b["BLOCK_D"]))
        _ce_bwd_cols_kernel[grid](q, k, scale32, row_max, log_sum, g, grad_k, m, n, d, q.stride(0), k.stride(0),
                                  grad_k.stride(0), row_offset, label_smoothing, uniform,
                                  b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], b["BLOCK_D"], _precision(q))
    return grad_q, grad_k, grad_scale
