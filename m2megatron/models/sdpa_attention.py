"""Core attention of the local spec on `torch.nn.functional.scaled_dot_product_attention` (no TE needed).

A drop-in for Megatron-Core's `DotProductAttention` inside `SelfAttention`: the same constructor and
`forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
packed_seq_params=None)`, with query/key/value [s, b, np, hn] → context [s, b, np·hn], the same
softmax scale (1/√hn) and the same masking semantics.

Masks. `attention_mask` is Megatron's boolean key mask [b, 1, 1, s] (True = masked: padded text
tokens, and the padding that sequence parallelism adds to a segment), or None. It becomes an additive
mask with the dtype's most negative finite value, which (unlike a boolean mask or −inf) leaves a
query whose keys are all masked with a uniform distribution instead of NaN, as Megatron's
`masked_fill(-10000)` does (its gradient is not cut as masked_fill cuts it; our inputs never have such
a row, the CLS token is always real); every other row gets the same probabilities as Megatron's (exp
underflows to 0 either way).

Which kernel runs (torch's SDPA dispatcher picks the first that accepts the inputs):
- CUDA, bf16/fp16, no mask (the vision tower without SP padding): FlashAttention-2 (or cuDNN attention
  where torch ranks it first);
- CUDA with a mask (text, VL block, padded segments), or fp32: memory-efficient attention (it takes
  additive masks; flash takes none), else cuDNN/math;
- CPU: the fused flash-attention CPU kernel for fp32/bf16 (masks allowed), else the math kernel.
Flash and memory-efficient kernels never store the [b, np, s, s] probabilities, so selective recompute of
core attention buys little with them; it still works (the module is checkpointed like Megatron's).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


def additive_key_mask(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean key mask [b, 1, 1, s] (True = masked) → additive mask of `dtype` (0 or the most negative value)."""
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(
        key_mask, torch.finfo(dtype).min)


class SDPAttention(MegatronModule):
    """Megatron `DotProductAttention`'s interface on torch's fused attention (see the module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("model.attention: 'sdpa' does not support context parallelism")
        if config.num_query_groups not in (None, config.num_attention_heads):
            raise ValueError("model.attention: 'sdpa' does not support grouped-query attention")
        if config.apply_query_key_layer_scaling or config.softmax_type != "vanilla":
            raise ValueError("model.attention: 'sdpa' supports plain softmax attention only")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.tp_group = pg_collection.tp
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, self.tp_group.size())
        head_dim = divide(projection, config.num_attention_heads)
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("model.attention: 'sdpa' supports neither packed sequences nor an attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        s, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, np, hn] → [b, np, s, hn]
        dropout = self.dropout_p if self.training else 0.0
        # Megatron draws attention dropout from the model-parallel RNG unless the sequence is split over TP.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_key_mask(attention_mask, q.dtype),
                                                     dropout_p=dropout, is_causal=causal, scale=self.softmax_scale)
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)  # [s, b, np·hn]

