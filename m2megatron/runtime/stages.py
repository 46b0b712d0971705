"""Which tower layers each pipeline stage holds, and which stages (chunks) a pipeline rank runs.

Stage s of the PP·VP stages holds tower layers `layer_ranges(...)[s]` of BOTH towers. With virtual
stages (interleaved 1F1B), model chunk v of pipeline rank p is stage v·PP + p, as Megatron's
interleaved schedule expects. The first stage embeds; the last one holds the VL block and the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.models.m2_encoder import default_layer_ranges


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


def stage_specs(num_layers: int, pp_size: int, pp_rank: int, vp_size: int | None) -> list[StageSpec]:
    """The stages pipeline rank `pp_rank` runs, in chunk order."""
    chunks = vp_size or 1
    total = pp_size * chunks
    ranges = default_layer_ranges(num_layers, total)
    specs = []
    for v in range(chunks):
        stage = v * pp_size + pp_rank
        specs.append(StageSpec(stage, stage == 0, stage == total - 1, ranges[stage]))
    return specs
