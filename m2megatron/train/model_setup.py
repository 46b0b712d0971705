"""Build this rank's pipeline-stage modules, initialise them by name and wrap them in Megatron DDP.

Stage s of PP·VP holds tower layers ranges[s] of both towers. With virtual stages (interleaved
1F1B), model chunk v of pipeline rank p is stage v·PP + p, as Megatron's interleaved schedule expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from m2megatron.config.run import RunConfig
from m2megatron.models.m2_encoder import M2Encoder, default_layer_ranges
from m2megatron.models.state import init_weights
from m2megatron.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class StageSpec:
    stage: int
    """Global pipeline stage index (0 … PP·VP − 1)."""
    pre_process: bool
    """Holds the embeddings (stage 0)."""
    post_process: bool
    """Holds the VL block and heads (last stage)."""
    layer_range: tuple[int, int]
    """[start, end) of the tower layers on this stage."""


def stage_specs(num_layers: int, pp_size: int, pp_rank: int, vp_size: int | None) -> list[StageSpec]:
    chunks = vp_size or 1
    total = pp_size * chunks
    ranges = default_layer_ranges(num_layers, total)
    specs = []
    for v in range(chunks):
        stage = v * pp_size + pp_rank
        specs.append(StageSpec(stage, stage == 0, stage == total - 1, ranges[stage]))
    return specs


def megatron_overrides(cfg: RunConfig) -> dict:
    """Trainer-level TransformerConfig fields (pipeline and recompute)."""
    overrides: dict = {
        # fp32 parameters and residual stream; bf16 is autocast (so stage outputs stay fp32).
        "pipeline_dtype": torch.float32,
        # Batched p2p with PP=2 and virtual stages matches send/recv crosswise on gloo (pitfalls.md).
        "batch_p2p_comm": cfg.parallel.virtual_pipeline is None,
        "batch_p2p_sync": False,
    }
    if cfg.train.recompute:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if cfg.train.bf16:
        overrides.update(enable_autocast=True, autocast_dtype=torch.bfloat16)
    return overrides


def build_stage_modules(cfg: RunConfig, groups: ParallelGroups) -> list[M2Encoder]:
    """Unwrapped stage modules of this rank, initialised identically for every layout of the same seed."""
    modules = []
    for spec in stage_specs(cfg.model.num_layers, groups.layout.pipeline_parallel, groups.pp_rank,
                            groups.layout.virtual_pipeline):
        module = M2Encoder(cfg.model, groups, pre_process=spec.pre_process, post_process=spec.post_process,
                           layer_range=spec.layer_range, **megatron_overrides(cfg))
        init_weights(module, cfg.train.seed)
        # Megatron's finalize_model_grads asks every pipeline stage whether embeddings are tied; ours never are.
        module.share_embeddings_and_output_weights = False
        # The interleaved schedule reads the virtual size from the model config. It is set only after
        # the layers exist: at construction it would make Megatron re-offset our global layer numbers.
        module.config.virtual_pipeline_model_parallel_size = groups.layout.virtual_pipeline
        module.config.microbatch_group_size_per_vp_stage = groups.layout.pipeline_parallel
        module.stage = spec
        modules.append(module)
    return modules


def wrap_ddp(modules: list[M2Encoder], groups: ParallelGroups, *, distributed_optimizer: bool) -> list:
    """Megatron DDP per chunk: contiguous fp32 grad buffers, reduced over the DP group after backward."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    return [
        DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m,
                                disable_bucketing=i > 0, pg_collection=groups.collection)
        for i, m in enumerate(modules)
    ]
