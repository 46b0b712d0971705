"""A weighted mixture of webdataset sources, each read through several open shards, with an exact position.

**Lanes.** Each reading rank reads every source through K open shards ("lanes"; K = the source's
open_shards, at most its shards // DP size). Lane j of DP rank r is the source's reader of virtual rank
r·K + j of P·K (m2megatron.data.sources / position): it reads whole, distinct shards of that source in
the source's own seeded epoch order, epoch after epoch; the lanes share all of an epoch's shards (the first
N mod P·K lanes read one more, `Work.share_remainder`): nothing is left out. A source that runs out starts
its next epoch while the others go on, so a small source is upsampled and a large one read once per epoch.

**Mixing.** Sample d of this rank comes from a lane drawn with probability weight_s / K_s (source s's
weight spread over its lanes), by a seeded generator of (seed, P, r, base, d // 4096): the draws are a
function of the sample count only, so the position needs no buffer. A microbatch of b therefore mixes
the sources in proportion and, within a source, K shards (each in its block-shuffled record order).

**Position** `{"draw": d, "lanes": [[lane position, ...] per source]}`: the draw count and each lane's
position in its work. At the same layout a restored reader continues exactly. At another DP size (or
open_shards) each source's lanes are redistributed like DP ranks (`position.redistribute` over the
saved P·K virtual ranks → the new P'·K' ones), so no record of a source epoch is read twice or dropped;
the draws continue with a new `base` (the saved ranks' total draws), so the mixture goes on in proportion.

**Resampled** (`data.resampled`): each lane draws its next shard uniformly with replacement from
(seed, lane, base, k) and has no epochs. The same layout resumes exactly; another layout starts new draws.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np

from m2megatron.config.base import ConfigError
from m2megatron.config.data import DataConfig
from m2megatron.data.captions import CaptionFields
from m2megatron.data.filters import Filters
from m2megatron.data.formats import expand_shards
from m2megatron.data.position import Work, redistribute, units_left
from m2megatron.data.shard_open import ShardFailures
from m2megatron.data.sources import WebdatasetSource, _rng

log = logging.getLogger("m2megatron.data")

_MIX, _RESAMPLE = 106, 107
MIX_BLOCK = 4096  # draws per seeded generator


@dataclass
class Component:
    """One source of the mixture as this rank reads it: its lanes (sources of virtual ranks r·K + j of P·K)."""

    name: str
    weight: float
    lanes: list


class ResampledShards(WebdatasetSource):
    """A lane that draws its k-th shard uniformly with replacement (no epochs); position {"epoch": 0,
    "draw": k, "record": records of shard k done}."""

    base = 0

    def start_position(self) -> dict:
        return {"epoch": 0, "draw": 0, "record": 0}

    def shard_of_draw(self, k: int) -> int:
        return int(_rng(self.seed, _RESAMPLE, self.dp_size, self.dp_rank, self.base, k).integers(self.num_units))

    def stream(self, position: dict):
        k, record = int(position["draw"]), int(position["record"])
        while True:
            for done, item in self._unit_items(k, self.shard_of_draw(k), record):
                yield item, {"epoch": 0, "draw": k, "record": done}
            k, record = k + 1, 0


class MixtureSource:
    """The stream of one reading rank over a weighted mixture (see the module docstring)."""

    kind, state_version, unit_name = "mixture", 3, "shards"

    def __init__(self, components: list[Component], seed: int, dp_rank: int, dp_size: int, resampled: bool = False):
        self.components, self.seed, self.dp_rank, self.dp_size = components, seed, dp_rank, dp_size
        self.resampled, self.base = resampled, 0
        self._flat = [(c, j) for c, comp in enumerate(components) for j in range(len(comp.lanes))]
        weights = np.array([components[c].weight / len(components[c].lanes) for c, _ in self._flat])
        self._p = weights / weights.sum()
        self._choices: tuple[int, np.ndarray] | None = None

    @property
    def num_units(self) -> int:
        return sum(comp.lanes[0].num_units for comp in self.components)

    def start_position(self) -> dict:
        return {"draw": 0, "lanes": [[lane.start_position() for lane in comp.lanes] for comp in self.components]}

    def epoch_of(self, position: dict) -> int:
        """The epoch every lane of every source has reached."""
        return min(int(p["epoch"]) for ps in position["lanes"] for p in ps)

    def lane_choices(self, block: int) -> np.ndarray:
        """Flat lane indices of draws [block·MIX_BLOCK, (block+1)·MIX_BLOCK) of this rank."""
        cached = self._choices
        if cached is None or cached[0] != block:
            rng = _rng(self.seed, _MIX, self.dp_size, self.dp_rank, self.base, block)
            cached = (block, rng.choice(len(self._p), size=MIX_BLOCK, p=self._p))
            self._choices = cached
        return cached[1]

    def stream(self, position: dict):
        draw = int(position["draw"])
        lanes = tuple(tuple(ps) for ps in position["lanes"])
        streams = [[lane.stream(p) for lane, p in zip(comp.lanes, ps)] for comp, ps in zip(self.components, lanes)]
        while True:
            for k in self.lane_choices(draw // MIX_BLOCK)[draw % MIX_BLOCK:]:
                c, j = self._flat[k]
                item, pos = next(streams[c][j])
                row = lanes[c]
                lanes = (*lanes[:c], (*row[:j], pos, *row[j + 1:]), *lanes[c + 1:])
                draw += 1
                yield item, {"draw": draw, "lanes": lanes}

    # -- the saved position ---------------------------------------------------------------------------------
    def state(self, position: dict) -> dict:
        sources = [{"name": comp.name, "units": comp.lanes[0].num_units,
                    "lanes": [{**lane.work.to_state(), "position": dict(p)} for lane, p in zip(comp.lanes, ps)]}
                   for comp, ps in zip(self.components, position["lanes"])]
        return {"kind": self.kind, "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "resampled": self.resampled, "base": self.base, "draw": int(position["draw"]), "sources": sources}

    def same_layout(self, states: list[dict]) -> bool:
        for state in states:
            self._check(state)
        return len(states) == self.dp_size and all(
            len(saved["lanes"]) == len(comp.lanes)
            for state in states for saved, comp in zip(state["sources"], self.components))

    def restore(self, state: dict) -> dict:
        self._check(state)
        if (int(state["dp_rank"]), int(state["dp_size"])) != (self.dp_rank, self.dp_size) or not self.same_layout(
                [state] * self.dp_size):
            raise ValueError(f"data loader state: saved by DP rank {state['dp_rank']} of {state['dp_size']} with "
                             f"{[len(s['lanes']) for s in state['sources']]} open shards per source, this is rank "
                             f"{self.dp_rank} of {self.dp_size} with {[len(c.lanes) for c in self.components]}; at "
                             "another layout hand every saved rank's state to load_global_state")
        lanes = []
        for comp, saved in zip(self.components, state["sources"]):
            row = []
            for lane, lane_state in zip(comp.lanes, saved["lanes"]):
                lane.work = Work.from_state(lane.num_units, lane.dp_rank, lane.dp_size, lane_state,
                                            lane.work.share_remainder)
                row.append(dict(lane_state["position"]))
            lanes.append(row)
        self._set_base(int(state["base"]))
        return {"draw": int(state["draw"]), "lanes": lanes}

    def restore_global(self, states: list[dict]) -> dict:
        for state in states:
            self._check(state)
        lanes = []
        for c, comp in enumerate(self.components):
            if self.resampled:  # no epochs: nothing to share out, every lane draws afresh
                lanes.append([lane.start_position() for lane in comp.lanes])
                continue
            share = comp.lanes[0].work.share_remainder
            saved = _saved_lanes(comp.lanes[0].num_units, [state["sources"][c] for state in states], share)
            size = self.dp_size * len(comp.lanes)
            plans, then = redistribute(saved, size)
            for lane in comp.lanes:
                lane.work = Work(lane.num_units, lane.dp_rank, size, plans[lane.dp_rank], then, share)
            lanes.append([lane.work.position() for lane in comp.lanes])
            if self.dp_rank == 0:
                log.info("data: source %s: position saved on %d lanes continues on %d: %d shards left, then epoch %d",
                         comp.name, len(saved), size, sum(map(units_left, plans)), then)
        self._set_base(max(int(s["base"]) for s in states) + sum(int(s["draw"]) for s in states))
        return {"draw": 0, "lanes": lanes}

    def _set_base(self, base: int) -> None:
        self.base, self._choices = base, None
        for comp in self.components:
            for lane in comp.lanes:
                lane.base = base

    def _check(self, state: dict) -> None:
        if state.get("version") != self.state_version or state.get("kind") != self.kind:
            raise ValueError(f"data loader state: expected version {self.state_version} of a mixture loader, got "
                             f"version {state.get('version')} of {state.get('kind')!r} (a run's data sources "
                             "cannot change from one list of shards to a mixture)")
        if state["seed"] != self.seed:
            raise ValueError(f"data loader state: saved with seed {state['seed']}, this run has {self.seed}")
        if bool(state.get("resampled")) != self.resampled:
            raise ValueError(f"data loader state: saved with data.resampled={bool(state.get('resampled'))}, this "
                             f"run has {self.resampled}")
        saved = [(s["name"], int(s["units"])) for s in state["sources"]]
        mine = [(c.name, c.lanes[0].num_units) for c in self.components]
        if saved != mine:
            raise ValueError(f"data loader state: saved with sources (name, shards) {saved}, this run has {mine}; "
                             "a position means nothing in another data set (weights may change, sources may not)")


def _saved_lanes(num_units: int, saved: list[dict], share_remainder: bool) -> list[tuple[Work, dict]]:
    """(work, position) of every saved lane of one source, in virtual-rank order (rank r's lane j = r·K + j)."""
    out = []
    for rank, source in enumerate(saved):
        k = len(source["lanes"])
        for j, lane in enumerate(source["lanes"]):
            work = Work.from_state(num_units, rank * k + j, len(saved) * k, lane, share_remainder)
            out.append((work, dict(lane["position"])))
    return out


def build_mixture(cfg: DataConfig, *, dp_rank: int, dp_size: int, seed: int) -> MixtureSource:
    """This reading rank's MixtureSource of cfg's webdataset sources (data.sources, or data.shards as one)."""
    components = []
    for i, src in enumerate(cfg.webdataset_sources()):
        setting = f"data.sources[{i}].shards" if cfg.sources else "data.shards"
        shards = expand_shards(src.shards, setting)
        if len(shards) < dp_size:
            raise ConfigError(f"{setting}: source {src.name!r} has {len(shards)} shard(s), fewer than the {dp_size} "
                              "data-parallel ranks (each rank reads whole, distinct shards of every source)")
        asked = src.open_shards or cfg.open_shards
        k = max(1, min(asked, len(shards) // dp_size))
        if k < asked and dp_rank == 0:
            log.info("data: source %s reads %d open shard(s) per rank, not %d: %d shards for %d data-parallel ranks",
                     src.name, k, asked, len(shards), dp_size)
        fields = CaptionFields(src.captions, src.language, src.caption_languages)
        source_seed = int(_rng(seed, zlib.crc32(src.name.encode())).integers(2**31))  # distinct orders per source
        lane_type = ResampledShards if cfg.resampled else WebdatasetSource
        filters = Filters([*cfg.filters, *src.filters])
        fraction = cfg.max_failed_shard_fraction if src.max_failed_shard_fraction is None \
            else src.max_failed_shard_fraction
        failures = ShardFailures(src.name, len(shards), dp_size, fraction, setting)  # shared by the lanes
        lanes = [lane_type(shards, source_seed, dp_rank * k + j, dp_size * k, cfg.shuffle_block, fields=fields,
                           filters=filters, name=src.name, setting=setting, failures=failures, share_remainder=True)
                 for j in range(k)]
        components.append(Component(src.name, src.weight, lanes))
    return MixtureSource(components, seed, dp_rank, dp_size, resampled=cfg.resampled)
