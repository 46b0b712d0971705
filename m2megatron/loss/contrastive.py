"""The image–text contrastive loss of one rank: its local rows against all columns of its loss group.

Notation (ARCHITECTURE.md §4, docs/LOSS.md): a loss group of G ranks, b local rows per rank,
n = G·b gathered columns. With s = exp(min(logit_scale, logit_scale_max)) and normalized embeddings,
rank r's loss is

    L_r = ½ [ CE_rows(s · I_r Tᵀ) + CE_rows(s · T_r Iᵀ) ],   positive of local row i = column r·b + i,

where I_r, T_r [b, d] are the local image/text rows, I, T [n, d] the gathered ones and CE_rows the mean
over rows of (label-smoothed) cross-entropy. This is OpenCLIP's ClipLoss(local_loss=True,
gather_with_grad=True) when G is the whole data-parallel group, and the grouped loss when G < P.

Gradient semantics: the gather's backward sums over the group, so each rank's embedding gradient is
∂(Σ_{r∈group} L_r)/∂(its rows), and the logit-scale gradient is ∂L_r/∂logit_scale. Megatron DDP then
averages weight gradients over the P data-parallel ranks, which gives exactly the gradient of
(1/P) Σ_r L_r = the mean over groups of the group losses (each group loss being the mean of its L_r).
So per-rank loss = mean over local rows is the right thing to hand to the schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from m2megatron_kernels.tiled_ce_reference import compute_dtype
from torch import Tensor

from m2megatron.config.loss import LossConfig
from m2megatron.loss.collectives import gather_pairs_with_grad, group_size_and_rank
from m2megatron.loss.ring import ring_clip_cross_entropy
from m2megatron.loss.tiled_ce import tiled_clip_cross_entropy


def effective_logit_scale(logit_scale: Tensor, logit_scale_max: float) -> Tensor:
    """s = exp(min(logit_scale, max)): the model's parameter is the LOG of the scale (init ln(1/0.07)).

    The clamp is torch.clamp, so while the parameter sits above the bound its gradient is 0.
    """
    return logit_scale.to(compute_dtype(logit_scale)).clamp(max=logit_scale_max).exp()


def _dense_cross_entropy(rows: Tensor, cols: Tensor, scale: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    dtype = compute_dtype(rows)
    logits = scale.to(dtype) * rows.to(dtype) @ cols.to(dtype).T  # [m, n], materialised
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def local_contrastive_loss(image_rows: Tensor, text_rows: Tensor, pairs: Tensor, scale: Tensor, row_offset: int, *,
                           label_smoothing: float = 0.0, chunk_size: int | None = None,
                           kernel: str = "auto") -> Tensor:
    """½ (image→text CE + text→image CE), mean over the m local rows; no communication.

    image_rows, text_rows [m, d]: this rank's rows; pairs [n, 2, d]: all columns (image, text), where
    columns row_offset … row_offset + m − 1 are this rank's rows (their positives). `scale` is the
    already exponentiated scale s. chunk_size None materialises the logits; an int tiles the columns.
    """
    if chunk_size is not None:
        per_row = tiled_clip_cross_entropy(image_rows, text_rows, pairs, scale, row_offset=row_offset,
                                           label_smoothing=label_smoothing, tile=chunk_size, kernel=kernel)
        return per_row.mean(dim=1).sum() / 2  # [2, m] → scalar
    image_cols, text_cols = pairs.unbind(dim=1)  # [n, d] each
    labels = torch.arange(row_offset, row_offset + image_rows.shape[0], device=image_rows.device)
    i2t = _dense_cross_entropy(image_rows, text_cols, scale, labels, label_smoothing)
    t2i = _dense_cross_entropy(text_rows, image_cols, scale, labels, label_smoothing)
    return (i2t + t2i) / 2


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, *,
                     group: dist.ProcessGroup | None, config: LossConfig | None = None) -> Tensor:
    """This rank's contrastive loss over its loss group (global mode: G = P; grouped: G < P).

    image_emb, text_emb [b, d]: L2-normalised embeddings of this rank, any float dtype; the gather
    (or the ring's p2p) runs in that dtype, the loss in fp32 (fp64 for fp64 inputs).
    logit_scale: the learnable LOG scale (0-d), clamped at config.logit_scale_max and exponentiated here.
    group: the loss group (ParallelGroups.loss); never the world group unless the world is the loss
    group. None means a group of one (no communication). With TP > 1 every TP rank passes its own
    DP sub-group and computes the same loss.
    config.exchange picks how the columns arrive: "gather" (one all-gather, then dense or chunked
    logits) or "ring" (ring.py: blocks passed around the group, O(b) memory); same loss and gradients.
    Returns a 0-d tensor: the mean over the b local rows of both directions, averaged.
    """
    config = config or LossConfig()
    scale = effective_logit_scale(logit_scale, config.logit_scale_max)
    if config.exchange == "ring":
        per_row = ring_clip_cross_entropy(image_emb, text_emb, scale, group=group,
                                          label_smoothing=config.label_smoothing, tile=config.chunk_size,
                                          kernel=config.kernel)
        return per_row.mean(dim=1).sum() / 2  # [2, b] → scalar
    if config.exchange != "gather":
        raise ValueError(f"loss.exchange: {config.exchange!r} is not one of ['gather', 'ring']")
    _, group_rank = group_size_and_rank(group)
    pairs = gather_pairs_with_grad(image_emb, text_emb, group)  # [G·b, 2, d]
    return local_contrastive_loss(image_emb, text_emb, pairs, scale,
                                  row_offset=group_rank * image_emb.shape[0],
                                  label_smoothing=config.label_smoothing, chunk_size=config.chunk_size,
                                  kernel=config.kernel)
