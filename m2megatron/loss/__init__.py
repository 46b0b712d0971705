"""The grouped image–text contrastive loss: global, grouped, accumulated; chunked or ring (docs/LOSS.md)."""

from m2megatron.loss.accumulated import CachedEmbeddingGrads, accumulated_loss_and_grads, surrogate_loss
from m2megatron.loss.contrastive import contrastive_loss, effective_logit_scale, local_contrastive_loss
from m2megatron.loss.ring import ring_clip_cross_entropy
from m2megatron.loss.tiled_ce import tiled_clip_cross_entropy
from m2megatron.loss.traffic import sent_bytes

__all__ = [
    "CachedEmbeddingGrads", "accumulated_loss_and_grads", "contrastive_loss", "effective_logit_scale",
    "local_contrastive_loss", "ring_clip_cross_entropy", "sent_bytes", "surrogate_loss", "tiled_clip_cross_entropy",
]
