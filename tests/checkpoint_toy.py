"""A tiny Megatron-Core model for checkpoint tests and the checkpoint benchmark.

It stands in for the M2 model: tensor-parallel linears, a `TransformerBlock` with the local spec
(so pipeline stages carry global layer numbers in their checkpoint keys) and a replicated head.
Every rank of a layout builds it from the same seed, so the full (unsharded) weights are identical
at every layout and a test can compare them after resharding.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig


def toy_config(hidden: int = 32, layers: int = 4, heads: int = 4, ffn: int | None = None,
               tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    return TransformerConfig(
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn or 4 * hidden,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, perform_initialization=True, init_method_std=0.02,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        pipeline_dtype=dtype,
    )


class ToyModel(MegatronModule):
    """Stage `pp_rank` of: in-proj (column ∥ row parallel) → transformer block → head (replicated)."""

    def __init__(self, config: TransformerConfig, pg_collection, in_dim: int = 8, out_dim: int = 4):
        super().__init__(config=config)
        self.pg_collection = pg_collection
        pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
        self.pre_process, self.post_process = pp_rank == 0, pp_rank == pp_size - 1
        self.tp_group = pg_collection.tp
        init = torch.nn.init.normal_
        if self.pre_process:
            self.in_col = tensor_parallel.ColumnParallelLinear(
                in_dim, config.ffn_hidden_size, config=config, init_method=init, bias=True, gather_output=False,
                tp_group=pg_collection.tp)
            self.in_row = tensor_parallel.RowParallelLinear(
                config.ffn_hidden_size, config.hidden_size, config=config, init_method=init, bias=True,
                input_is_parallel=True, skip_bias_add=False, tp_group=pg_collection.tp)
        spec = get_gpt_layer_local_spec()
        spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
        self.block = TransformerBlock(config, spec, pre_process=self.pre_process, post_process=self.post_process,
                                      pg_collection=pg_collection)
        if self.post_process:
            self.head = torch.nn.Linear(config.hidden_size, out_dim)
        self.input_tensor = None

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor
        self.block.set_input_tensor(self.input_tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_process:
            h, _ = self.in_col(x.to(self.config.params_dtype))  # [s, b, ffn/tp]
            x, _ = self.in_row(h)  # [s, b, hidden]
        else:
            x = None
        out = self.block(x, attention_mask=None)
        return self.head(out).float() if self.post_process else out


def build_toy(groups, *, hidden: int = 32, layers: int = 4, optimizer: str = "adam", distributed: bool = False,
              seed: int = 1234, train_steps: int = 100, bf16: bool = False):
    """(model_chunks, optimizer, scheduler) of the toy at `groups`' layout, DDP-wrapped like the trainer.

    bf16: Megatron mixed precision, bf16 parameters with fp32 main gradients and the optimizer's fp32 main
    weights (Float16OptimizerWithFloat16Params, or the DistributedOptimizer's fp32 shards)."""
    import dataclasses

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from m2megatron.config.optim import OptimConfig
    from m2megatron.parallel import seed_everything
    from m2megatron.runtime.optimizer import build_optimizer, build_scheduler

    layout = groups.layout
    seed_everything(seed, groups)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = toy_config(hidden=hidden, layers=layers, tp=layout.tensor_parallel, pp=layout.pipeline_parallel,
                        dtype=dtype)
    # Megatron's CPU initialization draws full weights from the default generator: the same seed on every
    # rank gives the same full weights at every layout. Then each rank gets its own streams for training.
    torch.manual_seed(seed)
    model = ToyModel(config, groups.collection).to(device=groups.device, dtype=dtype)
    seed_everything(seed, groups)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=distributed,
                                                                        grad_reduce_in_fp32=bf16),
                                  model, pg_collection=groups.collection)
    cfg = OptimConfig(optimizer=optimizer, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.01, clip_grad=0.0)
    if bf16:
        from m2megatron.runtime.optimizer import megatron_optimizer_config

        opt_config = dataclasses.replace(megatron_optimizer_config(cfg, distributed=distributed), bf16=True,
                                         params_dtype=dtype)
        opt = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=False,
                                     pg_collection=groups.collection)
    else:
        opt = build_optimizer([ddp], cfg, groups.collection, distributed=distributed)
    return [ddp], opt, build_scheduler(opt, cfg, train_steps)


def toy_batch(step: int, groups, global_batch: int = 8, seq: int = 4, in_dim: int = 8, out_dim: int = 4):
    """This DP rank's share of the global batch of `step` (the same global batch at every layout)."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(seq, global_batch, in_dim, generator=g)  # [s, b, in]
    y = torch.randn(seq, global_batch, out_dim, generator=g)
    dp, dp_rank = groups.layout.data_parallel, groups.dp_rank
    per = global_batch // dp
    return x[:, dp_rank * per:(dp_rank + 1) * per], y[:, dp_rank * per:(dp_rank + 1) * per]


def train_toy(chunks, optimizer, scheduler, groups, first_step: int, num_steps: int) -> list[float]:
    """Steps first_step .. first_step+num_steps-1 without pipelining (PP must be 1); global losses."""
    import torch.distributed as dist

    assert groups.layout.pipeline_parallel == 1, "the toy trains without a pipeline schedule"
    (ddp,) = chunks
    losses = []
    for step in range(first_step, first_step + num_steps):
        x, y = (t.to(groups.device) for t in toy_batch(step, groups))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        ddp.finish_grad_sync()
        optimizer.step()
        scheduler.step(1)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=groups.dp)
        losses.append(global_loss.item() / groups.layout.data_parallel)
    return losses


def build_toy_from_config(config: dict, groups):
    """The reshard builder for toy checkpoints (their saved config holds the toy's sizes under 'toy')."""
    return build_toy(groups, **dict((config or {}).get("toy") or {}))
