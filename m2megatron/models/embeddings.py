"""Input embeddings of the two towers (first pipeline stage only). Both return Megatron's [s, b, h] layout.

Positions follow fairseq/torchscale: learned absolute tables read from row 2 on (rows 0 and 1 unused).
"""

from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_size

from m2megatron.config.model import ModelConfig

POSITION_OFFSET = 2


def padded_vocab_size(cfg: ModelConfig, tp_size: int) -> int:
    """Rows of the vocab-parallel table: vocab_size rounded up to a multiple of lcm(vocab_pad_multiple, 128·TP)."""
    multiple = math.lcm(cfg.vocab_pad_multiple, 128 * tp_size)
    return -(-cfg.vocab_size // multiple) * multiple


class VisionEmbedding(MegatronModule):
    """Patch conv (with bias) → prepend cls token → add positions. Replicated across TP ranks."""

    def __init__(self, cfg: ModelConfig, config, tp_group):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.image_size = cfg.image_size
        d, p = cfg.hidden_size, cfg.patch_size
        dtype = config.params_dtype
        self.patch = torch.nn.Conv2d(cfg.num_channels, d, kernel_size=p, stride=p, bias=True, dtype=dtype)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, d, dtype=dtype))
        self.position_embeddings = torch.nn.Parameter(torch.zeros(cfg.vision_position_table, d, dtype=dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images: expected [b, C, {self.image_size}, {self.image_size}], got {list(pixels.shape)}")
        x = self.patch(pixels.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)  # [b, N, D], row-major
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [b, N+1, D]
        x = x + self.position_embeddings[POSITION_OFFSET:POSITION_OFFSET + x.shape[1]]
        return x.transpose(0, 1).contiguous()  # [N+1, b, D]


class TextEmbedding(MegatronModule):
    """Vocab-parallel token embedding + positions; padded positions are zeroed (encoder entry)."""

    def __init__(self, cfg: ModelConfig, config, tp_group):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.vocab_size = cfg.vocab_size
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab_size(cfg, get_pg_size(tp_group)), cfg.hidden_size, init_method=config.init_method,
            config=config, tp_group=tp_group)
        self.position_embeddings = torch.nn.Parameter(
            torch.zeros(cfg.text_position_table, cfg.hidden_size, dtype=config.params_dtype))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        if seq + POSITION_OFFSET > self.position_embeddings.shape[0]:
            raise ValueError(f"text: {seq} tokens need {seq + POSITION_OFFSET} position rows, "
                             f"the table has {self.position_embeddings.shape[0]}")
        x = self.word_embeddings(ids)  # [b, S, D]
        x = x + self.position_embeddings[POSITION_OFFSET:POSITION_OFFSET + seq]
        x = x * mask.unsqueeze(-1).to(x.dtype)  # the reference's x * (1 - padding_mask)
        return x.transpose(0, 1).contiguous()  # [S, b, D]
