"""Rank ↔ (tp, dp, pp) coordinate math, without any process group.

We use Megatron-Core's default order "tp-cp-ep-dp-pp" with cp = ep = 1: tensor parallel varies
fastest, then data parallel, then pipeline parallel, so a TP group is adjacent ranks (one node) and
a loss group of G consecutive DP ranks is as close together as the layout allows.

    rank = tp + TP · (dp + DP · pp)
"""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.config.base import ConfigError


@dataclass(frozen=True, kw_only=True)
class Layout:
    world_size: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    loss_group_size: int | None = None
    virtual_pipeline: int | None = None

    def __post_init__(self) -> None:
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        if tp < 1 or pp < 1 or self.world_size % (tp * pp):
            raise ConfigError(
                f"parallel.tensor_parallel: world size {self.world_size} is not divisible by "
                f"tensor_parallel×pipeline_parallel = {tp}×{pp}"
            )
        if self.loss_group_size is not None and self.data_parallel % self.loss_group_size:
            raise ConfigError(
                f"parallel.loss_group_size: {self.loss_group_size} does not divide the data-parallel "
                f"size {self.data_parallel}"
            )

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    @property
    def group_size(self) -> int:
        """G, the loss group size (the whole DP group when not set)."""
        return self.loss_group_size or self.data_parallel

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        tp, dp = self.tensor_parallel, self.data_parallel
        return rank % tp, (rank // tp) % dp, rank // (tp * dp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tensor_parallel * (dp_rank + self.data_parallel * pp_rank)

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tensor_parallel)]
                for p in range(self.pipeline_parallel) for d in range(self.data_parallel)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.data_parallel)]
                for p in range(self.pipeline_parallel) for t in range(self.tensor_parallel)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pipeline_parallel)]
                for d in range(self.data_parallel) for t in range(self.tensor_parallel)]

    def loss_groups(self) -> list[list[int]]:
        """Each DP group cut into runs of G consecutive DP ranks."""
        g = self.group_size
        return [dp_group[i:i + g] for dp_group in self.dp_groups() for i in range(0, len(dp_group), g)]
