"""Parallel layout: tensor, pipeline and data parallelism, and the contrastive-loss groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError
from m2megatron.config.stage_split import layer_ranges, stage_layer_counts


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
    """Tower layers on the first pipeline stage, which also holds the embeddings; with virtual stages the first
    chunk of pipeline rank 0. The stages without a set count share the rest evenly (at least one layer each).
    None: the even split. See m2megatron/config/stage_split.py and docs/TRAINING.md."""
    last_stage_layers: int | None = None
    """Tower layers on the last pipeline stage, which also runs the VL block on both modalities and the heads (so a
    balanced split gives it fewer); with virtual stages the last chunk of the last rank. None: the even split."""

    def validate(self, world_size: int | None = None, num_attention_heads: int | None = None,
                 num_layers: int | None = None) -> None:
        for name in ("tensor_parallel", "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather: needs parallel.distributed_optimizer=true (only the "
                              "distributed optimizer all-gathers parameters)")
        if self.bucket_size_mb is not None and self.bucket_size_mb <= 0:
            raise ConfigError(f"parallel.bucket_size_mb: must be positive or null, got {self.bucket_size_mb}")
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        if self.sequence_parallel and tp < 2:
            raise ConfigError("parallel.sequence_parallel: splits the sequence over the tensor-parallel ranks, "
                              f"so it needs parallel.tensor_parallel > 1 (got {tp})")
        if num_attention_heads is not None and num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_parallel: {tp} does not divide model.num_attention_heads={num_attention_heads}"
            )
        if self.virtual_pipeline is not None:
            if self.virtual_pipeline < 2:
                raise ConfigError("parallel.virtual_pipeline: must be >= 2 or null")
            if pp < 2:
                raise ConfigError("parallel.virtual_pipeline: needs parallel.pipeline_parallel >= 2")
        if num_layers is not None:
            stage_layer_counts(num_layers, pp, self.virtual_pipeline, self.first_stage_layers, self.last_stage_layers)
        elif pp < 2 and (self.first_stage_layers is not None or self.last_stage_layers is not None):
            raise ConfigError("parallel.first_stage_layers: needs parallel.pipeline_parallel >= 2")
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

    def layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """[start, end) of the tower layers on each global pipeline stage (PP·VP of them)."""
        return layer_ranges(num_layers, self.pipeline_parallel, self.virtual_pipeline, self.first_stage_layers,
                            self.last_stage_layers)

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel)
