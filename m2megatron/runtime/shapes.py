"""Build a stage on the meta device (no memory, no collectives) to count per-rank parameters.

A stand-in process group answers `size()` / `rank()`, which is all Megatron-Core's layers ask for while
they are constructed without initialization, so any TP size can be inspected from one process, without
a world of that size. The stage is built by the runtime's one stage builder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from m2megatron.config.model import ModelConfig, count_parameters
from m2megatron.models.embeddings import padded_vocab_size
from m2megatron.models.m2_encoder import M2Encoder
from m2megatron.models.transformer_config import transformer_config
from m2megatron.parallel.bootstrap import initialize, shape_world_env
from m2megatron.runtime.build import build_stage_module
from m2megatron.runtime.stages import StageSpec


class _ShapeOnlyGroup:
    """Answers size() and rank() only; any collective on it would fail loudly."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@dataclass
class _ShapeOnlyCollection:
    tp: _ShapeOnlyGroup
    pp: _ShapeOnlyGroup
    cp: _ShapeOnlyGroup


def build_on_meta(cfg: ModelConfig, *, tp_size: int = 1, tp_rank: int = 0, pre_process: bool = True,
                  post_process: bool = True, layer_range: tuple[int, int] | None = None) -> M2Encoder:
    """An uninitialized stage on the meta device as TP rank `tp_rank` of `tp_size` would hold it."""
    if not dist.is_initialized():  # Megatron treats every group as size 1 without a default group
        initialize(env=shape_world_env(), megatron_state=False)
    groups = _ShapeOnlyCollection(tp=_ShapeOnlyGroup(tp_size, tp_rank), pp=_ShapeOnlyGroup(1, 0),
                                  cp=_ShapeOnlyGroup(1, 0))
    config = transformer_config(cfg, tp_size=tp_size, perform_initialization=False, use_cpu_initialization=True)
    spec = StageSpec(stage=0, pre_process=pre_process, post_process=post_process,
                     layer_range=layer_range or (0, cfg.num_layers))
    return build_stage_module(cfg, config, groups, spec, torch.device("meta"))


def per_rank_parameter_counts(cfg: ModelConfig, tp_size: int) -> dict:
    """Parameters held by each TP rank (whole model on one stage), and how they add up to the config count.

    `total_unique` counts replicated tensors once and adds the shards of TP-split ones; minus the vocab
    padding rows it must equal `count_parameters(cfg)["total"]`.
    """
    from m2megatron.models.state import tp_axis

    ranks, unique = [], 0
    for rank in range(tp_size):
        model = build_on_meta(cfg, tp_size=tp_size, tp_rank=rank)
        ranks.append(sum(p.numel() for p in model.parameters()))
        unique += sum(p.numel() for n, p in model.named_parameters()
                      if rank == 0 or tp_axis(n) is not None)
    padding = (padded_vocab_size(cfg, tp_size) - cfg.vocab_size) * cfg.hidden_size
    return {"per_rank": ranks, "total_unique": unique, "vocab_padding": padding,
            "expected": count_parameters(cfg)["total"]}
