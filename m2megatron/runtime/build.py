"""Build this rank's pipeline-stage chunks, on the runtime device, for every entry point.

    stages = build_stages(cfg, groups)                   # training: DDP + optimizer + LR schedule
    stages = build_stages(cfg, groups, training=False)   # eval, encode, tools: the bare stage modules

The order is fixed: one TransformerConfig (runtime.megatron_config) → every stage module constructed
directly on `groups.device` (a `torch.device` context, so no tensor of ours or Megatron's is left on
the host) → Megatron's TP attributes on every sharded parameter (runtime.param_attributes) → parameters
in the run's dtype (train.precision) → deterministic init by parameter name (skipped on `meta`, which
holds no data) → a check that every parameter and buffer is on the device →
Megatron DDP (fp32 main gradients, optional overlap) → Megatron's (mixed-precision) optimizer → the
schedules' sync hooks assigned on the config (as Megatron-LM does after wrapping).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from m2megatron.config.model import ModelConfig
from m2megatron.config.run import RunConfig
from m2megatron.models.m2_encoder import M2Encoder
from m2megatron.models.state import init_weights
from m2megatron.parallel.groups import ParallelGroups
from m2megatron.runtime.megatron_config import (
    aligned_param_gather,
    attach_schedule_hooks,
    build_transformer_config,
    params_dtype,
)
from m2megatron.runtime.optimizer import build_optimizer, build_scheduler
from m2megatron.runtime.param_attributes import mark_tensor_parallel_params
from m2megatron.runtime.stages import StageSpec, stage_specs


@dataclass
class Stages:
    """This rank's stage chunks and what trains them."""

    cfg: RunConfig
    """The run config the stages were built from."""
    groups: ParallelGroups
    """Process groups (and the runtime device) of this rank."""
    config: TransformerConfig
    """The one Megatron config all chunks share."""
    specs: list[StageSpec]
    """Which stage each chunk is (one per virtual stage)."""
    modules: list[M2Encoder]
    """The bare stage modules (state dicts, checkpoints, eval)."""
    chunks: list
    """What the schedules run: the DDP wrappers when training, else the modules themselves."""
    optimizer: object | None = None
    """Megatron's optimizer over all chunks (training only)."""
    scheduler: object | None = None
    """Megatron's LR / weight-decay schedule (training only)."""

    @property
    def device(self) -> torch.device:
        return self.groups.device

    @property
    def is_first_stage(self) -> bool:
        """This rank embeds inputs (one of its chunks is stage 0)."""
        return any(s.pre_process for s in self.specs)

    @property
    def is_last_stage(self) -> bool:
        """This rank produces the embeddings (one of its chunks is the last stage)."""
        return any(s.post_process for s in self.specs)

    def train(self, mode: bool = True) -> None:
        for module in self.modules:
            module.train(mode)

    @contextlib.contextmanager
    def params_in_sync(self):
        """The parameters all-gathered now. With overlap_param_gather the distributed optimizer's updated
        shards are gathered lazily by the next forward; eval and checkpoints need them complete."""
        hooked = [c for c in self.chunks if getattr(c, "use_forward_hook", False)]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in hooked:
                chunk.enable_forward_pre_hook()


def build_stage_module(model_cfg: ModelConfig, config: TransformerConfig, pg_collection, spec: StageSpec,
                       device: torch.device) -> M2Encoder:
    """One stage module constructed on `device`, uninitialized (every tensor factory lands on it)."""
    with torch.device(device):
        module = M2Encoder(model_cfg, pg_collection, config=config, pre_process=spec.pre_process,
                           post_process=spec.post_process, layer_range=spec.layer_range)
    # Megatron's finalize_model_grads asks every stage whether embeddings are tied; ours never are.
    module.share_embeddings_and_output_weights = False
    module.stage = spec
    mark_tensor_parallel_params(module)  # before DDP and the optimizer, which copy the attributes
    cast_parameters(module, config.params_dtype)
    return module


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer in `dtype`, as Megatron's Float16Module does (torch's LayerNorm inside
    Megatron's WrappedTorchNorm, and our fp32 logit scale, are created in fp32). The optimizer keeps fp32 main
    copies, so only the forward sees bf16 values (the log temperature to 2⁻⁶ at ln(1/0.07); the loss
    exponentiates it in fp32)."""
    if dtype == torch.float32:
        return
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for sub in module.modules():
        for key, buf in sub._buffers.items():
            if buf is not None and buf.is_floating_point():
                sub._buffers[key] = buf.to(dtype)


def check_placement(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Raise if any parameter or buffer is not on the runtime device (a module placed by hand elsewhere)."""
    device = torch.device(device)
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device.type != device.type or (device.index is not None and tensor.device != device):
                raise RuntimeError(f"stage build: {name} is on {tensor.device}, the runtime device is {device}")


def build_stages(cfg: RunConfig, groups: ParallelGroups, *, training: bool = True, init: bool = True) -> Stages:
    """This rank's stage chunks of `cfg`'s model at `groups`' layout, on `groups.device`.

    training: wrap in Megatron DDP and build the optimizer and schedule. init: initialize by name from
    cfg.train.seed (every layout of a seed gets the same full weights); False leaves the memory
    uninitialized for a checkpoint load that follows.
    """
    config = build_transformer_config(cfg, groups)
    layout = groups.layout
    specs = stage_specs(cfg.model.num_layers, layout.pipeline_parallel, groups.pp_rank, layout.virtual_pipeline,
                        first=cfg.parallel.first_stage_layers, last=cfg.parallel.last_stage_layers)
    modules = [build_stage_module(cfg.model, config, groups.collection, spec, groups.device) for spec in specs]
    if init and groups.device.type != "meta":
        for module in modules:
            init_weights(module, cfg.train.seed)
    check_placement(modules, groups.device)
    stages = Stages(cfg=cfg, groups=groups, config=config, specs=specs, modules=modules, chunks=list(modules))
    if training:
        stages.chunks = wrap_ddp(modules, groups, ddp_config(cfg))
        stages.optimizer = build_optimizer(stages.chunks, cfg.optim, groups.collection,
                                           distributed=cfg.parallel.distributed_optimizer,
                                           params_dtype=params_dtype(cfg))
        attach_schedule_hooks(config, cfg, stages.chunks, stages.optimizer, groups.device)
        stages.scheduler = build_scheduler(stages.optimizer, cfg.optim, cfg.train.train_steps)
    return stages


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    """Megatron DDP: fp32 main gradients whatever the parameter dtype, optional overlap, bucket size."""
    par = cfg.parallel
    bucket = None if par.bucket_size_mb is None else max(1, int(par.bucket_size_mb * 2**20 / 4))  # fp32 grads
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
                                         overlap_param_gather=par.overlap_param_gather,
                                         align_param_gather=aligned_param_gather(cfg),
                                         use_distributed_optimizer=par.distributed_optimizer, bucket_size=bucket)


def wrap_ddp(modules: list[M2Encoder], groups: ParallelGroups, config: DistributedDataParallelConfig) -> list:
    """Megatron DDP per chunk; chunks after the first form one bucket (Megatron-LM's choice for VP)."""
    return [
        DistributedDataParallel(config=m.config, ddp_config=config, module=m,
                                disable_bucketing=i > 0, pg_collection=groups.collection)
        for i, m in enumerate(modules)
    ]
