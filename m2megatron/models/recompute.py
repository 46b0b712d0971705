"""Running a stack of layers with Megatron's activation recompute (the run's TransformerConfig decides).

- `recompute_granularity="selective"` (`recompute_modules=["core_attn"]`): Megatron's own
  `SelfAttention` checkpoints core attention inside each layer; the stack runs plainly here.
- `"full"`, `recompute_method="uniform"`: the stack is cut into groups of `recompute_num_layers`
  layers; each group keeps only its input and is re-run in backward (Megatron's TransformerBlock).
- `"full"`, `"block"`: the first `recompute_num_layers` layers of the stack are checkpointed one by
  one, the rest keep their activations.

Each stage has a vision and a text stack (its tower layers) and the last stage the VL stack, which
runs once per modality; each follows these rules on its own. Checkpointing is Megatron's
`tensor_parallel.checkpoint` (TE's `te_checkpoint` under FP8), which stores the CPU, CUDA and tracker
RNG states and restores them for the re-run, so drop-path masks are replayed exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core import tensor_parallel


def recomputed_layers(num_layers: int, method: str, group: int) -> int:
    """Layers of a stack of `num_layers` that full recompute re-runs in backward."""
    return num_layers if method == "uniform" else min(group, num_layers)


def _checkpoint(config, tp_group, fn, *args):
    if config.fp8:
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(fn, False, tensor_parallel.random.get_cuda_rng_tracker, tp_group, *args)
    return tensor_parallel.checkpoint(fn, False, *args)


def _layers_fn(layers: Sequence[torch.nn.Module]):
    def run(hidden, key_mask):
        for layer in layers:
            hidden, _ = layer(hidden, attention_mask=key_mask)
        return hidden
    return run


def run_stack(layers: Sequence[torch.nn.Module], hidden: torch.Tensor, key_mask: torch.Tensor | None, config,
              tp_group, training: bool) -> torch.Tensor:
    """`layers` in order on `hidden` [s, b, h] with `key_mask`, recomputing as `config` says when training."""
    layers = list(layers)
    # A checkpointed segment whose input needs no gradient would give its parameters none: run it plainly.
    if not (config.recompute_granularity == "full" and training and torch.is_grad_enabled()
            and hidden.requires_grad):
        return _layers_fn(layers)(hidden, key_mask)
    group = config.recompute_num_layers
    if config.recompute_method == "uniform":
        for start in range(0, len(layers), group):
            hidden = _checkpoint(config, tp_group, _layers_fn(layers[start:start + group]), hidden, key_mask)
        return hidden
    for index, layer in enumerate(layers):
        if index < group:
            hidden = _checkpoint(config, tp_group, _layers_fn([layer]), hidden, key_mask)
        else:
            hidden = _layers_fn([layer])(hidden, key_mask)
    return hidden
