"""Which tower layers each pipeline stage holds: the even split, or an uneven first / last stage.

    layer_ranges(21, pp=4, first=6, last=3)        → [(0, 6), (6, 12), (12, 18), (18, 21)]
    layer_ranges(21, pp=4, vp=2, first=3, last=0)  → stages of 3 layers, the last one none (VL block + heads only)

Both towers have L layers and stage s holds the same index range of both. The first stage also embeds the
inputs; the last one also runs the VL block (num_vl_layers layers on both modalities) and the heads, so a
balanced split gives it fewer tower layers (planning/stage_balance.py suggests one).

`first` / `last` count the layers of the first / last *global* stage of the PP·VP stages: without virtual
stages the first / last pipeline rank, with them the first chunk of pipeline rank 0 and the last chunk of
the last rank (chunk v of rank p is stage v·PP + p), which are the chunks holding the embeddings and the
heads. The stages in between share the rest evenly, at least one layer each. (Megatron-Core's
num_layers_in_first/last_pipeline_stage count a whole pipeline rank and split it over its chunks; counting
the one chunk that holds the embeddings / heads instead lets interleaved pipelines balance, e.g. 21 layers
+ 3 VL layers as PP=4 × VP=2 stages of 3.) 0 is allowed for `first` and `last`. Errors are one-line
ConfigErrors naming parallel.first_stage_layers / last_stage_layers, or parallel.pipeline_parallel for an
even split that does not divide L.
"""

import functools

from m2megatron.config.base import ConfigError

FIRST, LAST = "parallel.first_stage_layers", "parallel.last_stage_layers"


def _check_count(name: str, value: int | None, num_layers: int, stages: int) -> None:
    if value is None:
        return
    if stages < 2:
        raise ConfigError(f"{name}: needs parallel.pipeline_parallel >= 2")
    if not 0 <= value <= num_layers:
        raise ConfigError(f"{name}: must be in 0..model.num_layers={num_layers}, got {value}")


def _middle_count(num_layers: int, stages: int, first: int | None, last: int | None) -> int:
    """Layers per stage whose count is not given (a ConfigError if they do not split evenly, ≥ 1 each)."""
    given = [v for v in (first, last) if v is not None]
    rest, middle = num_layers - sum(given), stages - len(given)
    shown = " + ".join(f"{n}={v}" for n, v in (("first_stage_layers", first), ("last_stage_layers", last))
                       if v is not None)
    name = FIRST if first is not None else LAST
    if rest < 0:
        raise ConfigError(f"{name}: {shown} exceeds model.num_layers={num_layers}")
    if middle == 0:
        if rest:
            raise ConfigError(f"{name}: with 2 pipeline stages {shown} must equal model.num_layers={num_layers}")
        return 0
    if rest % middle or rest < middle:
        raise ConfigError(f"{name}: {shown} leaves {rest} of model.num_layers={num_layers} layers, which do not "
                          f"split evenly over the other {middle} pipeline stages (at least 1 layer each)")
    return rest // middle


def stage_layer_counts(num_layers: int, pp: int, vp: int | None = None, first: int | None = None,
                       last: int | None = None) -> list[int]:
    """Tower layers of each global stage s = v·PP + p (PP·VP entries), in pipeline order."""
    stages = pp * (vp or 1)
    if first is None and last is None:
        if num_layers % stages:
            raise ConfigError(
                f"parallel.pipeline_parallel: {stages} pipeline stages do not divide model.num_layers="
                f"{num_layers} (set parallel.first_stage_layers / last_stage_layers for an uneven split)")
        return [num_layers // stages] * stages
    _check_count(FIRST, first, num_layers, stages)
    _check_count(LAST, last, num_layers, stages)
    counts = [_middle_count(num_layers, stages, first, last)] * stages
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def rank_layer_counts(num_layers: int, pp: int, vp: int | None = None, first: int | None = None,
                      last: int | None = None) -> list[int]:
    """Tower layers of each pipeline rank (all its virtual stages together), first to last."""
    stages = stage_layer_counts(num_layers, pp, vp, first, last)
    return [sum(stages[p::pp]) for p in range(pp)]


def layer_ranges(num_layers: int, pp: int, vp: int | None = None, first: int | None = None,
                 last: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of the tower layers on each global stage, consecutive from stage 0."""
    return list(_layer_ranges(num_layers, pp, vp, first, last))


@functools.lru_cache(maxsize=4096)  # the layout planner asks for the same few splits thousands of times
def _layer_ranges(num_layers: int, pp: int, vp: int | None, first: int | None,
                  last: int | None) -> tuple[tuple[int, int], ...]:
    bounds = [0]
    for count in stage_layer_counts(num_layers, pp, vp, first, last):
        bounds.append(bounds[-1] + count)
    return tuple(zip(bounds[:-1], bounds[1:]))
