"""Row-wise contrastive cross-entropy over column tiles, in plain PyTorch (the reference of the kernel).

For rows q [m, d], columns k [n, d] and a scalar `scale`, the logits are z = scale · q kᵀ [m, n] and
the positive of row i is column row_offset + i. With label smoothing ε the loss of row i is

    ℓ_i = lse_i − (1 − ε) z_i,pos − (ε / n) Σ_j z_ij,        lse_i = log Σ_j exp(z_ij)

(= torch's cross_entropy(..., label_smoothing=ε) per row). Only one [m, tile] slice of the logits is
alive at a time. This is the CPU path of the chunked loss and the reference the Triton kernel
(tiled_ce_triton.py) is tested against.

Backward, with p_ij = exp(z_ij − lse_i), y_ij = (1 − ε)[j = pos_i] + ε/n and g_i = ∂L/∂ℓ_i:
    ∂L/∂z_ij = g_i (p_ij − y_ij)
    ∂L/∂q_i = scale · Σ_j ∂L/∂z_ij k_j,   ∂L/∂k_j = scale · Σ_i ∂L/∂z_ij q_i,   ∂L/∂scale = Σ_ij ∂L/∂z_ij z_ij / scale

Numerics (fp32 throughout — fp64 for fp64 inputs; bf16/fp16 inputs are upcast tile by tile):
- lse is kept as (row_max, log_sum): p = exp((z − row_max) − log_sum). lse itself (≈ 10–20 for a
  trained CLIP) has an fp32 rounding error of ulp(lse) ≈ 1e-6 that would bias every p of its row.
- ∂L/∂z is formed as p − y per element, as the dense cross-entropy does, before any sum: the scale
  gradient is a small difference (E_p[z] − z_pos), which a sum-then-subtract would lose to cancellation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (used by exactness tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _positives_in_tile(m: int, row_offset: int, start: int, width: int, device) -> tuple[Tensor, Tensor]:
    """(rows, columns within the tile) of the positives that fall into columns [start, start + width)."""
    cols = torch.arange(m, device=device) + (row_offset - start)
    rows = ((cols >= 0) & (cols < width)).nonzero().squeeze(1)
    return rows, cols[rows]


def ce_forward_stats(q: Tensor, k: Tensor, scale: Tensor, row_offset: int,
                     tile: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row statistics of z = scale · q kᵀ over the columns k, each [m] in the compute dtype.

    (row_max, row_sum = Σ_j exp(z_ij − row_max), z_pos = z_i,pos (0 where the positive is not among
    these columns), z_sum = Σ_j z_ij). Statistics of disjoint column blocks fold with `fold_stats`,
    which is how the ring exchange streams its blocks (m2megatron/loss/ring.py).
    """
    (m, _), n = q.shape, k.shape[0]
    dtype = compute_dtype(q)
    q_up, scale_up = q.to(dtype), scale.to(dtype)
    row_max = torch.full((m,), float("-inf"), dtype=dtype, device=q.device)
    row_sum, z_pos, z_sum = torch.zeros_like(row_max), torch.zeros_like(row_max), torch.zeros_like(row_max)
    for start in range(0, n, tile):
        z = (q_up @ k[start:start + tile].to(dtype).T).mul_(scale_up)  # [m, t]
        new_max = torch.maximum(row_max, z.max(dim=1).values)
        z_sum += z.sum(dim=1)
        rows, cols = _positives_in_tile(m, row_offset, start, z.shape[1], q.device)
        z_pos[rows] = z[rows, cols]
        exp_z = z.sub_(new_max[:, None]).exp_()  # in place: one [m, t] tile alive
        row_sum = row_sum * torch.exp(row_max - new_max) + exp_z.sum(dim=1)
        row_max = new_max
        del z, exp_z
    return row_max, row_sum, z_pos, z_sum


def fold_stats(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics of two disjoint column sets from theirs (online log-sum-exp: rescale to the new max)."""
    (max_a, sum_a, pos_a, zsum_a), (max_b, sum_b, pos_b, zsum_b) = a, b
    row_max = torch.maximum(max_a, max_b)
    row_sum = sum_a * torch.exp(max_a - row_max) + sum_b * torch.exp(max_b - row_max)
    return row_max, row_sum, pos_a + pos_b, zsum_a + zsum_b


def loss_from_stats(row_max: Tensor, row_sum: Tensor, z_pos: Tensor, z_sum: Tensor, num_columns: int,
                    label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ, row_max, log_sum) from the statistics over all `num_columns` columns."""
    log_sum = torch.log(row_sum)
    loss = ((row_max - z_pos) + log_sum) + label_smoothing * (z_pos - z_sum / num_columns)
    return loss, row_max, log_sum


def ce_forward(q: Tensor, k: Tensor, scale: Tensor, row_offset: int, label_smoothing: float,
               tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ, row_max, log_sum), each [m] in the compute dtype; backward needs row_max and log_sum."""
    stats = ce_forward_stats(q, k, scale, row_offset, tile)
    return loss_from_stats(*stats, k.shape[0], label_smoothing)


def ce_backward(q: Tensor, k: Tensor, scale: Tensor, row_offset: int, label_smoothing: float, row_max: Tensor,
                log_sum: Tensor, grad_loss: Tensor, tile: int, grad_k_out: Tensor | None = None,
                total_columns: int | None = None, row_grads: bool = True,
                col_grads: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(∂L/∂q, ∂L/∂k, ∂L/∂scale) given g = ∂L/∂ℓ, recomputing each logits tile once.

    ∂L/∂k is written tile by tile into `grad_k_out` ([n, d], any float dtype, may be a strided view)
    or a new tensor of k's dtype, so no full-size fp32 copy of it exists; ∂L/∂q has q's dtype.
    When k is one block of the loss's columns (the ring exchange), row_max and log_sum are those over
    all columns and `total_columns` their number (the n of the ε/n term); None: k is all of them.
    row_grads / col_grads: compute (∂L/∂q, ∂L/∂scale) / ∂L/∂k; what is not computed comes back None
    (the ring needs the rows' or the columns' gradients of a block, not both).
    """
    (m, _), n = q.shape, k.shape[0]
    uniform = label_smoothing / (total_columns or n)  # ε/n, the smoothed target of every column
    dtype = compute_dtype(q)
    q_up, g, scale_up = q.to(dtype), grad_loss.to(dtype), scale.to(dtype)
    grad_q = torch.zeros_like(q_up) if row_grads else None  # [m, d]
    grad_k = None
    if col_grads:
        grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device) if grad_k_out is None else grad_k_out
    grad_scale = torch.zeros((), dtype=dtype, device=q.device)
    for start in range(0, n, tile):
        k_tile = k[start:start + tile].to(dtype)  # [t, d]
        z = (q_up @ k_tile.T).mul_(scale_up)  # [m, t]
        grad_z = z - row_max[:, None]
        grad_z.sub_(log_sum[:, None]).exp_().sub_(uniform)  # p − ε/n, in place: two [m, t] tiles alive
        rows, cols = _positives_in_tile(m, row_offset, start, z.shape[1], q.device)
        grad_z[rows, cols] -= 1.0 - label_smoothing
        grad_z *= g[:, None]
        if row_grads:
            grad_scale += torch.dot(grad_z.view(-1), z.view(-1))  # Σ ∂L/∂z · z, without a product tile
            grad_q.addmm_(grad_z, k_tile)
        if col_grads:
            grad_k[start:start + tile] = (grad_z.T @ q_up).mul_(scale_up)  # [t, d], cast on copy
        del z, grad_z
    if not row_grads:
        return None, grad_k, None
    grad_scale = (grad_scale / scale_up).reshape(scale.shape)
    return grad_q.mul_(scale_up).to(q.dtype), grad_k, grad_scale.to(scale.dtype)
