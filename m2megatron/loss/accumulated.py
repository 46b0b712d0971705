"""Batch accumulation (A > 1): the loss over G·b·A samples with exact gradients, in two passes (GradCache).

The trainer drives it:
1. A forward-only pass over the A microbatches collects each microbatch's embeddings [b, d].
2. `accumulated_loss_and_grads` concatenates them into A·b local rows and computes, against the
   group's G·A·b columns (all-gathered, or passed around the ring with loss.exchange=ring), the loss
   and its gradient with respect to every microbatch's embeddings and to logit_scale (autograd on
   detached copies; the exchange's backward runs here).
3. A forward–backward pass recomputes each microbatch (with the same randomness) and backpropagates
   `surrogate_loss`, whose gradient with respect to the embeddings is the cached gradient.

The result is the same loss and the same weight gradients as one microbatch of size A·b per rank
(checked by tests/distributed/test_loss_parity.py), at the memory of one microbatch of activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from m2megatron_kernels.tiled_ce_reference import compute_dtype
from torch import Tensor

from m2megatron.config.loss import LossConfig
from m2megatron.loss.contrastive import contrastive_loss


@dataclass(kw_only=True)
class CachedEmbeddingGrads:
    loss: Tensor
    """This rank's loss over its A·b rows against the group's G·A·b columns (0-d, detached)."""
    image_grads: list[Tensor]
    """Per microbatch: ∂(Σ_{r in group} L_r)/∂image_emb [b, d] (the gather's backward sums over the group)."""
    text_grads: list[Tensor]
    """Per microbatch: the same for the text embeddings."""
    logit_scale_grad: Tensor
    """∂L_r/∂logit_scale (0-d), with respect to the LOG scale parameter, through the clamp."""

    @property
    def num_microbatches(self) -> int:
        return len(self.image_grads)


def accumulated_loss_and_grads(image_embs: Sequence[Tensor], text_embs: Sequence[Tensor], logit_scale: Tensor,
                               *, group: dist.ProcessGroup | None,
                               config: LossConfig | None = None) -> CachedEmbeddingGrads:
    """Pass 2 of batch accumulation: loss and embedding gradients over all A microbatches.

    image_embs, text_embs: the A microbatches' embeddings [b_a, d] of this rank (detached is fine;
    they are detached here). All ranks of `group` must call this together with the same total rows.
    Same modes as `contrastive_loss` (config.exchange, chunk_size, kernel, label_smoothing, logit_scale_max).
    """
    if len(image_embs) != len(text_embs) or not image_embs:
        raise ValueError(f"accumulated loss: got {len(image_embs)} image and {len(text_embs)} text microbatches")
    sizes = [emb.shape[0] for emb in image_embs]
    with torch.enable_grad():
        images = torch.cat([emb.detach() for emb in image_embs]).requires_grad_()  # [A·b, d]
        texts = torch.cat([emb.detach() for emb in text_embs]).requires_grad_()  # [A·b, d]
        scale = logit_scale.detach().clone().requires_grad_()
        loss = contrastive_loss(images, texts, scale, group=group, config=config)
        grad_images, grad_texts, grad_scale = torch.autograd.grad(loss, (images, texts, scale))
    return CachedEmbeddingGrads(loss=loss.detach(), image_grads=list(grad_images.split(sizes)),
                                text_grads=list(grad_texts.split(sizes)), logit_scale_grad=grad_scale)


def surrogate_loss(image_emb: Tensor, text_emb: Tensor, cached: CachedEmbeddingGrads, microbatch: int,
                   logit_scale: Tensor | None = None) -> Tensor:
    """Pass 3 of batch accumulation: the loss to backpropagate for microbatch `microbatch`.

    Its gradient is ⟨image_emb, cached grad⟩ + ⟨text_emb, cached grad⟩ (+ logit_scale · its cached
    gradient / A when `logit_scale` is given, so the A microbatches together contribute it once);
    summed over the A microbatches this reproduces the exact gradients of the accumulated loss. Its
    value is cached.loss / A, so the A values add up to the loss for logging. Megatron's schedules
    divide each microbatch loss by num_microbatches; a caller going through them scales by A back.
    """
    image_grad, text_grad = cached.image_grads[microbatch], cached.text_grads[microbatch]
    if image_emb.shape != image_grad.shape or text_emb.shape != text_grad.shape:
        raise ValueError(f"surrogate loss: microbatch {microbatch} embeddings {tuple(image_emb.shape)}/"
                         f"{tuple(text_emb.shape)} do not match the cached gradients {tuple(image_grad.shape)}")
    num = cached.num_microbatches
    dtype = compute_dtype(image_grad)
    surrogate = (image_emb.to(dtype) * image_grad.to(dtype)).sum() + (text_emb.to(dtype) * text_grad.to(dtype)).sum()
    if logit_scale is not None:
        surrogate = surrogate + logit_scale.to(dtype) * cached.logit_scale_grad.to(dtype) / num
    return surrogate - surrogate.detach() + cached.loss / num  # value: loss / A; gradient: the surrogate's
