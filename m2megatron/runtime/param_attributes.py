"""Megatron's tensor-parallel parameter attributes, set from our sharding table and checked after the build.

Megatron-Core 0.16.1's ColumnParallelLinear, RowParallelLinear and VocabParallelEmbedding mark their weight
`tensor_model_parallel` (with `partition_dim`, `partition_stride`) only inside their own initializers,
which `perform_initialization=False` skips (we initialize by name: models.state.init_weights); biases are
marked unconditionally. Megatron's gradient norm (`param_is_not_tensor_parallel_duplicate`) counts an
unmarked parameter on TP rank 0 only, as if it were replicated, so at TP > 1 it left out every other
rank's share of every sharded weight, and clipping acted on that smaller norm. The optimizer copies these
attributes onto its main parameters when it is built, so they must be right before it exists.
"""

from __future__ import annotations

import torch

from m2megatron.models.state import tp_axis

_STRIDE = 1
"""Every sharded tensor of ours is one contiguous block per rank (models.state.shard_full_state_dict)."""


def mark_tensor_parallel_params(module: torch.nn.Module) -> None:
    """Give every parameter that `tp_axis` says is TP-sharded Megatron's attributes, then check them all."""
    for name, param in module.named_parameters():
        axis = tp_axis(name)
        if axis is not None and not getattr(param, "tensor_model_parallel", False):
            param.tensor_model_parallel = True
            param.partition_dim = axis
            param.partition_stride = _STRIDE
    check_tensor_parallel_params(module)


def check_tensor_parallel_params(module: torch.nn.Module) -> None:
    """Raise if a parameter's Megatron TP attributes disagree with our sharding table (models.state.tp_axis)."""
    wrong = []
    for name, param in module.named_parameters():
        axis = tp_axis(name)
        marked = bool(getattr(param, "tensor_model_parallel", False))
        if axis is None and marked:
            wrong.append(f"{name} is replicated but marked tensor_model_parallel")
        elif axis is not None and not marked:
            wrong.append(f"{name} is sharded on axis {axis} but not marked tensor_model_parallel")
        elif axis is not None and getattr(param, "partition_dim", axis) != axis:
            wrong.append(f"{name} is sharded on axis {axis} but marked partition_dim={param.partition_dim}")
    if wrong:
        raise RuntimeError("stage build: tensor-parallel attributes disagree with models.state.tp_axis: "
                           + "; ".join(wrong))
