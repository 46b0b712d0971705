"""The one Megatron-Core TransformerConfig of a run, shared by every stage chunk.

It joins the model's layer settings (m2megatron.models.transformer_config) with the runtime's: pipeline
dtype and p2p flags, virtual stages, recompute, initialization (we initialize by name ourselves), and
finalize_model_grads. The hooks Megatron's schedules call on the DDP wrappers and the optimizer (no_sync,
grad_sync, param_sync, grad_scale) belong to objects that need this config to be built, so the builder
assigns them afterwards (`attach_schedule_hooks`), as Megatron-LM's training.py does.

The config's `pipeline_model_parallel_size` is 1 at every PP size, on purpose (set where it is built,
models/transformer_config.py): our stages are split by us (runtime.stages) and every layer gets its
global layer number; with the real PP size Megatron's TransformerLayer would add its own stage offset
(`get_transformer_layer_offset`) and TransformerConfig would check an even split we do not use.
Megatron's schedules take the real PP size from the process groups; the one config field derived from
it, microbatch_group_size_per_vp_stage, is set here from the layout.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.transformer.transformer_config import TransformerConfig

from m2megatron.config.run import RunConfig
from m2megatron.models.transformer_config import transformer_config
from m2megatron.parallel.groups import ParallelGroups
from m2megatron.runtime.timers import PhaseTimers

PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "bf16-autocast": torch.float32}
"""train.precision → the dtype of the parameters and of the activations between stages."""


def params_dtype(cfg: RunConfig) -> torch.dtype:
    """Parameter dtype, which is also the dtype of the activations sent between stages (fp32 with autocast)."""
    return PARAMS_DTYPE[cfg.train.precision]


def runtime_overrides(cfg: RunConfig, groups: ParallelGroups) -> dict:
    """TransformerConfig fields set by the runtime rather than by the model's sizes."""
    layout = groups.layout
    vp = layout.virtual_pipeline
    overrides: dict = {
        # Every parameter is initialized by name afterwards (models.state.init_weights): Megatron's own
        # init would be wasted work, and on the meta device impossible.
        "perform_initialization": False,
        "use_cpu_initialization": groups.device.type != "cuda",
        "pipeline_dtype": params_dtype(cfg),
        # Batched p2p with PP=2 and virtual stages matches send/recv crosswise on gloo (pitfalls.md).
        "batch_p2p_comm": vp is None,
        "batch_p2p_sync": False,
        "virtual_pipeline_model_parallel_size": vp,
        # The config says PP=1 (module docstring), so Megatron's default group size would be 1.
        "microbatch_group_size_per_vp_stage": layout.pipeline_parallel if vp else None,
        "finalize_model_grads_func": finalize_model_grads,
        "barrier_with_L1_time": False,  # a barrier would move waiting time between phases
    }
    par = cfg.parallel
    # Sequence parallelism: the model pads and scatters its segments (models.sequence_parallel).
    overrides["sequence_parallel"] = par.sequence_parallel
    train = cfg.train
    if train.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method=train.recompute_method,
                         recompute_num_layers=train.recompute_num_layers)
    elif train.recompute == "selective":
        overrides.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if train.precision == "bf16-autocast":
        overrides.update(enable_autocast=True, autocast_dtype=torch.bfloat16)
    return overrides


def aligned_param_gather(cfg: RunConfig) -> bool:
    """With virtual stages the interleaved schedule dispatches each chunk's parameter all-gather itself
    (Megatron's align_param_gather); otherwise the forward pre-hooks do."""
    return cfg.parallel.overlap_param_gather and cfg.parallel.virtual_pipeline is not None


def build_transformer_config(cfg: RunConfig, groups: ParallelGroups) -> TransformerConfig:
    """The run's TransformerConfig for this rank's stage chunks (shared by all of them)."""
    return transformer_config(cfg.model, tp_size=groups.layout.tensor_parallel, params_dtype=params_dtype(cfg),
                              **runtime_overrides(cfg, groups))


def attach_schedule_hooks(config: TransformerConfig, cfg: RunConfig, chunks: list, optimizer, device) -> None:
    """Point the schedules' hooks at the DDP chunks and the optimizer, as Megatron-LM's training.py does
    after wrapping (one callable per chunk: a list with virtual stages, the callable itself without), and give
    them the run's phase timers (logging.timers; training builds only)."""
    def per_chunk(name: str):
        funcs = [getattr(chunk, name) for chunk in chunks]
        return funcs if len(funcs) > 1 else funcs[0]

    par = cfg.parallel
    if par.overlap_grad_reduce:
        config.no_sync_func = per_chunk("no_sync")
        config.grad_sync_func = per_chunk("start_grad_sync")
    if aligned_param_gather(cfg):
        config.param_sync_func = per_chunk("start_param_sync")
    if cfg.train.precision == "fp16":
        config.grad_scale_func = optimizer.scale_loss
    if cfg.logging.timers:  # the schedules and finalize_model_grads time their phases
        config.timers = PhaseTimers(cfg.logging.timers, device)
