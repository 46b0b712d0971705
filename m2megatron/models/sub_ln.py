"""Sub-LN (Magneto) pieces: a LayerNorm over a TP-sharded dimension, and LN → row-parallel linear.

The reference normalizes the attention context (width D) before the output projection and the FFN
hidden (width F) before fc2. Under tensor parallelism both widths are split across TP ranks, so the
LayerNorm statistics must be summed over the TP group. Megatron-Core has no such module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import RowParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide, get_pg_size


def all_reduce_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over `group` in forward and backward.

    Each rank uses the summed statistics on its own shard, so each rank's gradient w.r.t. the sum
    differs and the true gradient is their sum: copy (bwd all-reduce) then reduce (fwd all-reduce).
    """
    return reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(x, group), group)


class TPLayerNorm(torch.nn.Module):
    """LayerNorm over the last dimension, which is sharded across the TP group.

    Holds this rank's slice of weight and bias (a contiguous 1/TP of `full_size`). With TP=1 it is
    exactly `F.layer_norm`. With TP>1 the per-token sum and sum of squares (in fp32) are all-reduced
    in one collective; the result equals an unsharded LayerNorm to fp32 rounding.
    """

    def __init__(self, full_size: int, *, eps: float, tp_group, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tp_group = tp_group
        self.tp_size = get_pg_size(tp_group)
        self.full_size = full_size
        self.eps = eps
        local = divide(full_size, self.tp_size)
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(local, dtype=params_dtype))
        for p in (self.weight, self.bias):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)
        torch.nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        xf = x.float()
        stats = torch.stack([xf.sum(-1), xf.square().sum(-1)], dim=-1)  # [..., 2]
        stats = all_reduce_with_grad(stats, self.tp_group)
        mean = stats[..., :1] / self.full_size
        var = (stats[..., 1:] / self.full_size - mean.square()).clamp_min(0.0)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.float() + self.bias.float()).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0, "bias": 0}, sharded_offsets,
                                                   tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


class SubLNRowParallelLinear(MegatronModule):
    """TP-aware LayerNorm over the (sharded) input, then a row-parallel linear.

    Drop-in for Megatron's `linear_proj` / `linear_fc2` submodules: same constructor arguments and the
    same `(output, bias)` return. `linear` is the row-parallel class (Megatron's or Transformer Engine's).
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 input_is_parallel: bool, skip_bias_add: bool, is_expert: bool = False,
                 tp_comm_buffer_name: str | None = None, tp_group=None, linear=RowParallelLinear):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.norm = TPLayerNorm(input_size, eps=config.layernorm_epsilon, tp_group=tp_group,
                                params_dtype=config.params_dtype)
        self.linear = build_module(linear, input_size, output_size, config=config, init_method=init_method,
                                   bias=bias, input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add,
                                   is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name,
                                   tp_group=tp_group)

    def forward(self, x: torch.Tensor):
        return self.linear(self.norm(x))

    def backward_dw(self) -> None:
        if hasattr(self.linear, "backward_dw"):
            self.linear.backward_dw()
