"""Parallel layout: tensor, pipeline and data parallelism, and the contrastive-loss groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size TP: ranks that split each layer's weights."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size PP: stages that split the layers of both towers."""
    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved 1F1B); None disables interleaving."""
    loss_group_size: int | None = None
    """Contrastive-loss group size G: embeddings are gathered only inside groups of G consecutive
    data-parallel ranks. None means the whole data-parallel group (global loss)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto picks nccl when CUDA is available, else gloo."""
    distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel group (Megatron-Core DistributedOptimizer, Adam only)."""
    timeout_s: int = 600
    """Timeout of process-group creation and of every collective, so a rank failing alone cannot hang the job."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism with TP > 1: LayerNorms, dropout and residuals run on 1/TP of the tokens of
    each segment (image and text segments are padded to a multiple of TP, the padding masked)."""
    overlap_grad_reduce: bool = False
    """Reduce gradients bucket by bucket while backward still runs (Megatron DDP's overlap_grad_reduce)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: all-gather updated parameters bucket by bucket during the next forward."""
    bucket_size_mb: float | None = None
    """DDP bucket size in MiB of gradients; None: Megatron's default (40 M elements, at least 1 M × DP)."""
    first_stage_layers: int | None = None
    """Tower layers on the first pipeline stage (it also holds the embeddings); None splits evenly."""
    last_stage_layers: int | None = None
    """Tower layers on the last pipeline stage (it also holds the VL block and the heads); None splits evenly."""

    def validate(self, world_size: int | None = None, num_attention_heads: int | None = None,
                 num_layers: int | None = None) -> None:
        for name in ("tensor_parallel", "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        if self.sequence_parallel and tp < 2:
            raise ConfigError("parallel.sequence_parallel: splits the sequence over the tensor-parallel ranks, "
                              f"so it needs parallel.tensor_parallel > 1 (got {tp})")
        if num_attention_heads is not None and num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_parallel: {tp} does not divide model.num_attention_heads={num_attention_heads}"
            )
        stages = pp * (self.virtual_pipeline or 1)
        if self.virtual_pipeline is not None:
            if self.virtual_pipeline < 2:
                raise ConfigError("parallel.virtual_pipeline: must be >= 2 or null")
            if pp < 2:
                raise ConfigError("parallel.virtual_pipeline: needs parallel.pipeline_parallel >= 2")
        if num_layers is not None and num_layers % stages:
            raise ConfigError(
                f"parallel.pipeline_parallel: {stages} pipeline stages do not divide model.num_layers={num_layers}"
            )
        if world_size is not None:
            if world_size % (tp * pp):
                raise ConfigError(
                    f"parallel.tensor_parallel: world size {world_size} is not divisible by "
                    f"tensor_parallel×pipeline_parallel = {tp}×{pp}"
                )
            dp = world_size // (tp * pp)
            if self.loss_group_size is not None:
                if self.loss_group_size < 1 or dp % self.loss_group_size:
                    raise ConfigError(
                        f"parallel.loss_group_size: {self.loss_group_size} does not divide the "
                        f"data-parallel size {dp} (world {world_size} / TP {tp} / PP {pp})"
                    )

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel)
