"""Sub-LN (Magneto) pieces: a LayerNorm over a TP-sharded dimension, and LN → row-parallel linear.

The reference normalizes the attention context (width D) before the output projection and the FFN
hidden (width F) before fc2. Under tensor parallelism both widths are split across TP ranks, so the
LayerNorm statistics must be summed over the TP group. Megatron-Core has no such module.

Two implementations of the TP>1 case (`model.sub_ln_kernel`): eager torch ops around the statistics
all-reduce, or Triton kernels (m2megatron_kernels.sub_ln_triton) doing two passes around it in forward and
in backward, chosen by capability ('auto': Triton on a CUDA tensor when Triton is installed, else eager).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.distributed as dist
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


SUB_LN_KERNELS = ("auto", "eager", "triton")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(kernel: str, x: torch.Tensor) -> bool:
    """Whether `kernel` (model.sub_ln_kernel) runs the Triton kernels on `x`."""
    if kernel not in SUB_LN_KERNELS:
        raise ValueError(f"model.sub_ln_kernel: unknown {kernel!r} (known: {', '.join(SUB_LN_KERNELS)})")
    if kernel == "auto":
        return x.is_cuda and _triton_installed()
    return kernel == "triton"


class _TritonTPLayerNorm(torch.autograd.Function):
    """TPLayerNorm's TP>1 forward and backward as Triton passes around one all-reduce each (the module
    docstring of m2megatron_kernels.sub_ln_triton has the formulas); keeps x as it came, μ and r."""

    @staticmethod
    def forward(ctx, x, weight, bias, full_size: int, eps: float, group):
        from m2megatron_kernels import sub_ln_triton as kernels  # lazily: defining the kernels needs triton

        rows = x.reshape(-1, x.shape[-1]).contiguous()
        stats = kernels.row_stats(rows)
        if get_pg_size(group) > 1:
            dist.all_reduce(stats, group=group)
        y, mean, rstd = kernels.normalize(rows, weight, bias, stats, full_size, eps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.full_size, ctx.group = full_size, group
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        from m2megatron_kernels import sub_ln_triton as kernels

        rows, weight, mean, rstd = ctx.saved_tensors
        grad_rows = grad_y.reshape(rows.shape).contiguous()
        sums = kernels.grad_row_sums(grad_rows, rows, weight, mean, rstd)
        if get_pg_size(ctx.group) > 1:
            dist.all_reduce(sums, group=ctx.group)
        grad_x = kernels.grad_input(grad_rows, rows, weight, mean, rstd, sums, ctx.full_size)
        grad_w, grad_b = kernels.grad_params(grad_rows, rows, mean, rstd)
        return grad_x.view(grad_y.shape), grad_w.to(weight.dtype), grad_b.to(weight.dtype), None, None, None


def eager_tp_layer_norm(x, weight, bias, full_size: int, eps: float, group) -> torch.Tensor:
    """The LayerNorm over `full_size` columns of which x holds this rank's, in eager fp32 torch ops."""
    xf = x.float()
    stats = torch.stack([xf.sum(-1), xf.square().sum(-1)], dim=-1)  # [..., 2]
    stats = all_reduce_with_grad(stats, group)
    mean = stats[..., :1] / full_size
    var = (stats[..., 1:] / full_size - mean.square()).clamp_min(0.0)
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * weight.float() + bias.float()).to(x.dtype)


def tp_layer_norm(x, weight, bias, full_size: int, eps: float, group, kernel: str = "auto") -> torch.Tensor:
    """The LayerNorm over `full_size` columns of which x holds this rank's, by `kernel` (use_triton). A group of
    one skips the all-reduce: tools/bench_subln.py times the passes alone that way."""
    if use_triton(kernel, x):
        return _TritonTPLayerNorm.apply(x, weight, bias, full_size, eps, group)
    return eager_tp_layer_norm(x, weight, bias, full_size, eps, group)


class TPLayerNorm(torch.nn.Module):
    """LayerNorm over the last dimension, which is sharded across the TP group.

    Holds this rank's slice of weight and bias (a contiguous 1/TP of `full_size`). With TP=1 it is
    exactly `F.layer_norm`. With TP>1 the per-token sum and sum of squares (in fp32) are all-reduced
    in one collective; the result equals an unsharded LayerNorm to fp32 rounding. `kernel`: see
    SUB_LN_KERNELS and use_triton.
    """

    def __init__(self, full_size: int, *, eps: float, tp_group, params_dtype: torch.dtype = torch.float32,
                 kernel: str = "auto"):
        super().__init__()
        self.tp_group, self.kernel = tp_group, kernel
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
        return tp_layer_norm(x, self.weight, self.bias, self.full_size, self.eps, self.tp_group, self.kernel)

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
                 tp_comm_buffer_name: str | None = None, tp_group=None, linear=RowParallelLinear,
                 norm_kernel: str = "auto"):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.norm = TPLayerNorm(input_size, eps=config.layernorm_epsilon, tp_group=tp_group,
                                params_dtype=config.params_dtype, kernel=norm_kernel)
        self.linear = build_module(linear, input_size, output_size, config=config, init_method=init_method,
                                   bias=bias, input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add,
                                   is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name,
                                   tp_group=tp_group)

    def forward(self, x: torch.Tensor):
        return self.linear(self.norm(x))

    def backward_dw(self) -> None:
        if hasattr(self.linear, "backward_dw"):
            self.linear.backward_dw()
