"""Forward FLOPs of each pipeline stage, their imbalance, and first/last-rank layer counts that balance them.

A stage's forward FLOPs per sample (matmuls, planning/flops.py's convention): its tower layers of both
towers (one vision layer on the image tokens + one text layer on the text tokens each), plus on the first
stage the patch embedding (the text embedding is a lookup), plus on the last stage the VL block
(num_vl_layers layers on both modalities) and the two projections. The 1F1B steady state runs at the
pace of the busiest pipeline rank, so the imbalance is max(rank FLOPs) / mean(rank FLOPs), with a rank's
FLOPs summed over its virtual stages; the warm-up and cool-down run chunk by chunk, where the virtual
stages' max / mean counts (the layout planner stretches the bubble by it).

    balanced_split(preset("m2-10b"), pp=4)   → StageSplit(first=None, last=3, ...)   # 6 | 6 | 6 | 3 + 3 VL
"""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.config.base import ConfigError
from m2megatron.config.model import ModelConfig
from m2megatron.config.stage_split import stage_layer_counts
from m2megatron.planning.flops import layer_forward_flops


@dataclass(frozen=True, kw_only=True)
class StageSplit:
    first: int | None
    """parallel.first_stage_layers (None: the even split)."""
    last: int | None
    """parallel.last_stage_layers (None: the even split)."""
    rank_flops: tuple[float, ...]
    """Forward FLOPs per sample of each pipeline rank (its virtual stages summed)."""
    stage_flops: tuple[float, ...]
    """Forward FLOPs per sample of each global (virtual) stage, in pipeline order."""

    @property
    def imbalance(self) -> float:
        """max / mean of the ranks' FLOPs (1.0 = balanced): the steady state's slow-down."""
        return max(self.rank_flops) * len(self.rank_flops) / sum(self.rank_flops)

    @property
    def stage_imbalance(self) -> float:
        """max / mean of the virtual stages' FLOPs: the warm-up and cool-down (bubble) run chunk by chunk."""
        return max(self.stage_flops) * len(self.stage_flops) / sum(self.stage_flops)

    @property
    def spread(self) -> float:
        """max / min − 1 of the ranks' FLOPs (what the 10% acceptance bound is checked on)."""
        return max(self.rank_flops) / min(self.rank_flops) - 1


def layer_pair_flops(cfg: ModelConfig) -> int:
    """One tower layer of each modality (or one VL layer on both), forward, per sample."""
    return layer_forward_flops(cfg, cfg.num_image_tokens) + layer_forward_flops(cfg, cfg.max_text_len)


def embedding_flops(cfg: ModelConfig) -> int:
    """Patch-embedding convolution per sample (the text embedding and positions are lookups and adds)."""
    return 2 * cfg.num_patches * cfg.num_channels * cfg.patch_size ** 2 * cfg.hidden_size


def head_flops(cfg: ModelConfig) -> int:
    """VL block on both modalities and the two CLS projections per sample."""
    return cfg.num_vl_layers * layer_pair_flops(cfg) + 2 * 2 * cfg.hidden_size * cfg.embed_dim


def stage_forward_flops(cfg: ModelConfig, pp: int, vp: int | None = None, first: int | None = None,
                        last: int | None = None) -> list[float]:
    """Forward FLOPs per sample of each global stage s = v·PP + p, in pipeline order."""
    counts = stage_layer_counts(cfg.num_layers, pp, vp, first, last)
    pair = layer_pair_flops(cfg)
    flops = [float(n * pair) for n in counts]
    flops[0] += embedding_flops(cfg)
    flops[-1] += head_flops(cfg)
    return flops


def stage_split(cfg: ModelConfig, pp: int, vp: int | None = None, first: int | None = None,
                last: int | None = None) -> StageSplit:
    """The split with its per-rank FLOPs (a ConfigError if the counts do not make a valid split)."""
    stages = stage_forward_flops(cfg, pp, vp, first, last)
    ranks = [sum(stages[p::pp]) for p in range(pp)]
    return StageSplit(first=first, last=last, rank_flops=tuple(ranks), stage_flops=tuple(stages))


def valid_splits(cfg: ModelConfig, pp: int, vp: int | None = None) -> list[StageSplit]:
    """Every distinct valid split, each spelled with the fewest settings: the even one (None, None) if the
    stages divide L, then first only, last only, and both."""
    if pp == 1:
        return [stage_split(cfg, 1, vp)]
    counts = range(cfg.num_layers + 1)
    pairs = ([(None, None)] + [(f, None) for f in counts] + [(None, la) for la in counts]
             + [(f, la) for f in counts for la in counts if f + la <= cfg.num_layers])
    seen: dict[tuple, StageSplit] = {}
    for first, last in pairs:
        try:
            per_stage = tuple(stage_layer_counts(cfg.num_layers, pp, vp, first, last))
        except ConfigError:
            continue
        if per_stage not in seen:
            seen[per_stage] = stage_split(cfg, pp, vp, first, last)
    return list(seen.values())


def candidate_splits(cfg: ModelConfig, pp: int, vp: int | None = None, limit: int = 3) -> list[StageSplit]:
    """The `limit` best-balanced valid splits (by rank imbalance, then virtual-stage imbalance, then fewer
    layers on stage 0, whose rank holds the most microbatches in flight), plus the even split if it exists."""
    splits = valid_splits(cfg, pp, vp)
    ranked = sorted(splits, key=lambda s: (round(s.imbalance, 6), round(s.stage_imbalance, 6),
                                           stage_layer_counts(cfg.num_layers, pp, vp, s.first, s.last)[0]))
    best = ranked[:limit]
    return best + [s for s in splits if s.first is None and s.last is None and s not in best]


def balanced_split(cfg: ModelConfig, pp: int, vp: int | None = None) -> StageSplit:
    """The valid split with the smallest FLOP imbalance (a ConfigError if PP·VP admits none)."""
    splits = candidate_splits(cfg, pp, vp, limit=1)
    if not splits:
        raise ConfigError(f"parallel.pipeline_parallel: no split of model.num_layers={cfg.num_layers} over "
                          f"{pp} pipeline ranks × {vp or 1} virtual stages gives every stage a layer")
    return splits[0]
