"""The local spec's LayerNorm over the full hidden width, usable with sequence parallelism.

Megatron-Core's `WrappedTorchNorm` refuses `sequence_parallel` (its weights would see only this rank's
tokens and nobody would sum their gradients), and its fused LayerNorm needs apex. This is
`torch.nn.LayerNorm` with Megatron's norm constructor; under SP its weight and bias carry Megatron's
`sequence_parallel` attribute, so `finalize_model_grads` all-reduces their gradients over the TP group.
State-dict names (`weight`, `bias`) are those of `torch.nn.LayerNorm`.
"""

from __future__ import annotations

import torch


class LayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm(hidden_size, eps)` in `config.params_dtype`, built the way Megatron builds norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, sequence_parallel: bool | None = None,
                 **_unused_megatron_norm_options):
        """sequence_parallel: whether its inputs are split along the sequence (default: `config.sequence_parallel`);
        False for a norm that sees the same rows on every TP rank (its gradients are complete already)."""
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        split = config.sequence_parallel if sequence_parallel is None else sequence_parallel
        for param in (self.weight, self.bias):
            param.sequence_parallel = bool(split)
