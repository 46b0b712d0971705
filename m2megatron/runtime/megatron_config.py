"""The one Megatron-Core TransformerConfig of a run, built once and never changed by us afterwards.

It joins the model's layer settings (m2megatron.models.transformer_config) with the runtime's: pipeline
dtype and p2p flags, virtual stages, recompute, initialization (we initialize by name ourselves), and the
hooks Megatron's schedules call (finalize_model_grads, the DDP no-sync / grad-sync / param-sync hooks).

The DDP hooks belong to wrappers that can only be built after the config exists (DDP takes it), so the
config holds small forwarding callables of a `ChunkSyncHooks`, which the builder attaches to the DDP
chunks once they exist.
"""

from __future__ import annotations

import functools

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


class ChunkSyncHooks:
    """Forwards Megatron's schedule hooks to the DDP chunk (or optimizer) they belong to, attached after wrapping."""

    def __init__(self) -> None:
        self.chunks: list = []
        self.optimizer = None

    def attach(self, chunks: list, optimizer=None) -> None:
        self.chunks, self.optimizer = list(chunks), optimizer

    def scale_loss(self, loss):
        """fp16: the dynamic loss scale applied before backward (Megatron's grad_scale_func)."""
        return self.optimizer.scale_loss(loss)

    def no_sync(self, index: int):
        return self.chunks[index].no_sync()

    def start_grad_sync(self, index: int, *args, **kwargs):
        return self.chunks[index].start_grad_sync(*args, **kwargs)

    def start_param_sync(self, index: int, *args, **kwargs):
        return self.chunks[index].start_param_sync(*args, **kwargs)

    def funcs(self, name: str, num_chunks: int):
        """One forwarding callable per chunk: a list with virtual stages, the callable itself without."""
        funcs = [functools.partial(getattr(self, name), i) for i in range(num_chunks)]
        return funcs if num_chunks > 1 else funcs[0]


def params_dtype(cfg: RunConfig) -> torch.dtype:
    """Parameter dtype, which is also the dtype of the activations sent between stages (fp32 with autocast)."""
    return PARAMS_DTYPE[cfg.train.precision]


def runtime_overrides(cfg: RunConfig, groups: ParallelGroups, hooks: ChunkSyncHooks | None) -> dict:
    """TransformerConfig fields set by the runtime rather than by the model's sizes."""
    layout = groups.layout
    vp = layout.virtual_pipeline
    num_chunks = vp or 1
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
        # Our config says PP=1 (stages are ours), so Megatron's default group size would be 1.
        "microbatch_group_size_per_vp_stage": layout.pipeline_parallel if vp else None,
        "finalize_model_grads_func": finalize_model_grads,
        "barrier_with_L1_time": False,  # a barrier would move waiting time between phases
    }
    if hooks is not None and cfg.logging.timers:  # training: the schedules time their phases (logging.timers)
        overrides["timers"] = PhaseTimers(cfg.logging.timers, groups.device)
    par = cfg.parallel
    if hooks is not None and par.overlap_grad_reduce:  # as Megatron-LM's training loop wires them
        overrides["no_sync_func"] = hooks.funcs("no_sync", num_chunks)
        overrides["grad_sync_func"] = hooks.funcs("start_grad_sync", num_chunks)
    if hooks is not None and par.overlap_param_gather and aligned_param_gather(cfg):
        overrides["param_sync_func"] = hooks.funcs("start_param_sync", num_chunks)
    if hooks is not None and cfg.train.precision == "fp16":
        overrides["grad_scale_func"] = hooks.scale_loss
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


def build_transformer_config(cfg: RunConfig, groups: ParallelGroups,
                             hooks: ChunkSyncHooks | None = None) -> TransformerConfig:
    """The run's TransformerConfig for this rank's stage chunks (shared by all of them)."""
    return transformer_config(cfg.model, tp_size=groups.layout.tensor_parallel, params_dtype=params_dtype(cfg),
                              **runtime_overrides(cfg, groups, hooks))
