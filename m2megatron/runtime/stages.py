"""Which tower layers each pipeline stage holds, and which stages (chunks) a pipeline rank runs.

Stage s of the PP·VP stages holds tower layers `layer_ranges(...)[s]` of BOTH towers: the even split, or
the uneven one of parallel.first_stage_layers / last_stage_layers (m2megatron/config/stage_split.py, the
same function the config validation and the memory planner use). With virtual stages (interleaved 1F1B),
model chunk v of pipeline rank p is stage v·PP + p, as Megatron's interleaved schedule expects. The first
stage embeds; the last one holds the VL block and the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.config.stage_split import layer_ranges

__all__ = ["StageSpec", "layer_ranges", "stage_specs"]


@dataclass(frozen=True)
class StageSpec:
    stage: int
    """Global pipeline stage index (0 … PP·VP − 1)."""
    pre_process: bool
    """Holds the embeddings (stage 0)."""
    post_process: bool
    """Holds the VL block and heads (the last stage)."""
    layer_range: tuple[int, int]
    """[start, end) of the tower layers on this stage."""


def stage_specs(num_layers: int, pp_size: int, pp_rank: int, vp_size: int | None, *,
                first: int | None = None, last: int | None = None) -> list[StageSpec]:
    """The stages pipeline rank `pp_rank` runs, in chunk order. `first` / `last`: tower layers of the first /
    last pipeline rank (None: the even split)."""
    chunks = vp_size or 1
    total = pp_size * chunks
    ranges = layer_ranges(num_layers, pp_size, vp_size, first, last)
    specs = []
    for v in range(chunks):
        stage = v * pp_size + pp_rank
        specs.append(StageSpec(stage, stage == 0, stage == total - 1, ranges[stage]))
    return specs
