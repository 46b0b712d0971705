"""Per-rank sample streams with a small, resumable position that does not depend on the layout.

Each source turns (seed, epoch) into an epoch's global order of units (samples, or shards) and yields
one data-parallel rank's share of it, `(item, position)` pairs forever (epoch after epoch). The share
and the position are `m2megatron.data.position`'s `Work` and position dict: handing the position back
to `stream(position)` continues with exactly the next item the uninterrupted stream would yield, and
every saved rank's (work, position) tells exactly which records of an epoch are read, at any layout.

- synthetic / jsonl: the unit is a sample; the order a seeded permutation of all samples per epoch;
  rank r of P takes every P-th slot from slot r, the same count on every rank (the N mod P last slots
  are left out of the epoch and counted as `left_out_samples` by DP rank 0).
- webdataset: the unit is a shard; the order a seeded permutation of the shards per epoch; rank r takes
  every P-th shard (the same count on every rank, so the left-out shards, counted as `left_out_shards`,
  change from epoch to epoch). Inside a shard, records are read in tar order in blocks of
  `shuffle_block` and each block is permuted. A position inside a shard is the count of records emitted
  from it; resuming reopens the shard and skips whole records without reading their data. A shard that
  cannot be opened is an `unreadable_shard` skip (shard_open.ShardFailures decides when that stops the job).
- a mixture (m2megatron.data.mixture) reads several webdataset sources through WebdatasetSource "lanes".
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2megatron.config.base import ConfigError
from m2megatron.data.captions import CaptionFields
from m2megatron.data.filters import Filters
from m2megatron.data.formats import JsonlItem, iter_tar_records, read_file, record_json
from m2megatron.data.position import Work, redistribute, units_left
from m2megatron.data.shard_open import ShardError, ShardFailures
from m2megatron.data.skips import BadSample
from m2megatron.data.synthetic import SyntheticScenes

log = logging.getLogger("m2megatron.data")

# Distinct RNG stream tags, so no two uses of the seed collide.
_ORDER, _SHARDS, _BLOCK, _CAPTION, _AUG = 101, 102, 103, 104, 105


@dataclass
class Item:
    """One sample before decoding: encoded image bytes, or (synthetic) ready uint8 HWC pixels."""

    key: str
    caption: str
    encoded: bytes | None = None
    pixels: np.ndarray | None = None
    aug_key: tuple[int, ...] = ()  # seeds the per-sample augmentation RNG
    source: str = ""  # the mixture source's name (per-source counts); "" outside a mixture
    language: str = ""  # the caption's language tag; "" when unknown
    filters: Filters | None = None  # image-header filters the loader's probe applies (aspect ratio)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in key])


class _Source:
    """The stream of one data-parallel rank over its `Work` (m2megatron.data.position): units in the epoch's
    global order, their records, and the left-out slots of each epoch as counted skips."""

    kind, left_out_reason, unit_name = "", "", "units"
    records_per_unit: int | None = None  # one for samples; a shard's count is known only at its end

    def __init__(self, num_units: int, seed: int, dp_rank: int, dp_size: int, order_tag: int,
                 share_remainder: bool = False):
        self.seed, self._order_tag = seed, order_tag
        self.work = Work(num_units, dp_rank, dp_size, share_remainder=share_remainder)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def num_units(self) -> int:
        return self.work.num_units

    @property
    def dp_rank(self) -> int:
        return self.work.dp_rank

    @property
    def dp_size(self) -> int:
        return self.work.dp_size

    def global_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s seeded permutation of the units (the same at any layout)."""
        cached = self._order  # one read: the loader thread and the caller may both ask
        if cached is None or cached[0] != epoch:
            cached = (epoch, _rng(self.seed, self._order_tag, epoch).permutation(self.num_units))
            self._order = cached
        return cached[1]

    def epoch_units(self, epoch: int) -> list[int]:
        """This rank's units of epoch `epoch` at its standard share (no plan)."""
        seg = Work(self.num_units, self.dp_rank, self.dp_size, (), epoch, self.work.share_remainder).segment(0)
        return [int(u) for u in self.global_order(epoch)[seg.start:seg.stop:seg.step]]

    def start_position(self) -> dict:
        return self.work.position()

    def epoch_of(self, position: dict) -> int:
        return int(position["epoch"])

    # -- the saved position (TrainLoader.state_dict / load_state_dict / load_global_state) ----------------
    def state(self, position: dict) -> dict:
        """This rank's work and `position` in it, as saved in the checkpoint (JSON-able)."""
        return {"kind": self.kind, "seed": self.seed, "units": self.num_units, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, **self.work.to_state(), "position": dict(position)}

    def same_layout(self, states: list[dict]) -> bool:
        """Whether `states` (every saved rank's, in rank order) were saved at this layout."""
        return len(states) == self.dp_size

    def restore(self, state: dict) -> dict:
        """Take this rank's saved work; returns the position to continue from."""
        work, position = self.saved_work(state)
        if (work.dp_rank, work.dp_size) != (self.dp_rank, self.dp_size):
            raise ValueError(f"data loader state: saved by DP rank {work.dp_rank} of {work.dp_size}, this is rank "
                             f"{self.dp_rank} of {self.dp_size}; at another layout hand every saved "
                             "rank's state to load_global_state")
        self.work = work
        return position

    def restore_global(self, states: list[dict]) -> dict:
        """Share the unread rest of the saved ranks' epochs out over this layout (position.redistribute);
        returns this rank's position."""
        saved = [self.saved_work(s) for s in states]
        plans, then = redistribute(saved, self.dp_size)
        self.work = Work(self.num_units, self.dp_rank, self.dp_size, plans[self.dp_rank], then)
        if self.dp_rank == 0:
            sizes = [units_left(p) for p in plans]
            log.info("data: position saved at DP size %d continues at %d: %d %s of epochs %d-%d left, %d-%d per rank; "
                     "then epoch %d", len(saved), self.dp_size, sum(sizes), self.unit_name,
                     min(work.segment(int(pos["segment"])).epoch for work, pos in saved), then - 1,
                     min(sizes), max(sizes), then)
        return self.work.position()

    def saved_work(self, state: dict) -> tuple[Work, dict]:
        """(work, position) of a saved state, after checking it belongs to this source (versions 1 and 2)."""
        if state.get("version") not in (1, 2) or state.get("kind") != self.kind:
            raise ValueError(f"data loader state: expected version 2 of a {self.kind!r} loader, got "
                             f"version {state.get('version')} of {state.get('kind')!r}")
        if state["seed"] != self.seed:
            raise ValueError(f"data loader state: saved with seed {state['seed']}, this run has {self.seed}")
        units = int(state.get("units", self.num_units))  # version 1 did not record it
        if units != self.num_units:
            raise ValueError(f"data loader state: saved with {units} {self.unit_name}, this run's data has "
                             f"{self.num_units}; a position means nothing in another data set")
        rank, size = int(state["dp_rank"]), int(state["dp_size"])
        pos = state["position"]
        if state["version"] == 1:  # the standard share from the saved epoch on, no plan
            work = Work(units, rank, size, (), int(pos["epoch"]))
            unit, record = (pos["index"], 0) if "index" in pos else (pos["shard"], pos["record"])
            return work, work.position(0, int(unit), int(record))
        work = Work.from_state(units, rank, size, state)
        return work, work.position(int(pos["segment"]), int(pos["unit"]), int(pos["record"]))

    def stream(self, position: dict) -> Iterator[tuple[Item | BadSample, dict]]:
        index, unit, record = int(position["segment"]), int(position["unit"]), int(position["record"])
        emitted = int(position.get("left_out", 0))
        while True:
            seg, work = self.work.segment(index), self.work
            order = self.global_order(seg.epoch)
            if (unit, record) == (0, 0):
                yield from self._left_out(seg.epoch, order, work.left_out(index), work.position(index), emitted)
            for k in range(unit, len(seg)):
                start = seg.start_record(k, record if k == unit else 0)
                for done, item in self._unit_items(seg.epoch, int(order[seg.slots[k]]), start):
                    if done == self.records_per_unit:
                        yield item, work.position(index, k + 1, 0)
                    else:
                        yield item, work.position(index, k, done)
            index, unit, record, emitted = index + 1, 0, 0, 0

    def _left_out(self, epoch: int, order: np.ndarray, slots: range, position: dict, emitted: int = 0):
        """The left-out slots from the `emitted`-th on, each as a counted skip with the count so far."""
        if not slots[emitted:]:
            return
        if not emitted:
            log.info("data: epoch %d leaves out %d of %d %s (the remainder of %d %% %d data-parallel ranks), "
                     "counted as %s", epoch, len(slots), self.num_units, self.unit_name, self.num_units, self.dp_size,
                     self.left_out_reason)
        for n, s in enumerate(slots[emitted:], start=emitted + 1):
            yield BadSample(self.left_out_reason, self.describe(int(order[s]))), {**position, "left_out": n}

    def _unit_items(self, epoch: int, unit: int, start: int) -> Iterator[tuple[int, Item | BadSample]]:
        """(records done after it, item) for the records of `unit` from record `start` on."""
        raise NotImplementedError

    def describe(self, unit: int) -> str:
        raise NotImplementedError


class IndexedSource(_Source):
    """Random-access samples (synthetic scenes, jsonl records): the unit is a sample."""

    left_out_reason, unit_name, records_per_unit = "left_out_samples", "samples", 1

    def __init__(self, num_samples: int, seed: int, dp_rank: int, dp_size: int):
        if num_samples < dp_size:
            raise ConfigError(f"data: {num_samples} samples cannot feed {dp_size} data-parallel ranks")
        super().__init__(num_samples, seed, dp_rank, dp_size, _ORDER)
        self.num_samples = num_samples

    def _unit_items(self, epoch: int, unit: int, start: int):
        if start >= 1:
            return
        try:
            item = self.item(unit, epoch)
        except BadSample as bad:
            item = bad
        yield 1, item

    def item(self, sample: int, epoch: int) -> Item:
        raise NotImplementedError


class SyntheticSource(IndexedSource):
    kind = "synthetic"

    def __init__(self, scenes: SyntheticScenes, num_samples: int, seed: int, dp_rank: int, dp_size: int):
        super().__init__(num_samples, seed, dp_rank, dp_size)
        self.scenes = scenes

    def item(self, sample: int, epoch: int) -> Item:
        s = self.scenes[sample]
        return Item(key=s.key, caption=s.caption, pixels=s.image)

    def describe(self, unit: int) -> str:
        return f"synthetic sample {unit}"


class JsonlSource(IndexedSource):
    kind = "jsonl"

    def __init__(self, items: list[JsonlItem], image_root: str | Path, seed: int, dp_rank: int, dp_size: int):
        super().__init__(len(items), seed, dp_rank, dp_size)
        self.items, self.image_root = items, Path(image_root)

    def item(self, sample: int, epoch: int) -> Item:
        rec = self.items[sample]
        captions = [c for c in rec.captions if c.strip()]
        if not captions:
            raise BadSample("empty_caption", rec.image)
        caption = captions[int(_rng(self.seed, _CAPTION, epoch, sample).integers(len(captions)))]
        data = read_file(self.image_root / rec.image)
        return Item(key=rec.image, caption=caption, encoded=data, aug_key=(self.seed, _AUG, epoch, sample))

    def describe(self, unit: int) -> str:
        return self.items[unit].image


class WebdatasetSource(_Source):
    kind, left_out_reason, unit_name = "webdataset", "left_out_shards", "shards"

    def __init__(self, shards: list[str], seed: int, dp_rank: int, dp_size: int, shuffle_block: int = 256, *,
                 fields: CaptionFields | None = None, filters: Filters | None = None, name: str = "",
                 setting: str = "data.shards", failures: ShardFailures | None = None, share_remainder: bool = False):
        if len(shards) < dp_size:
            raise ConfigError(f"{setting}: {len(shards)} shard(s) cannot feed {dp_size} data-parallel ranks "
                              f"(each rank reads whole, distinct shards)")
        super().__init__(len(shards), seed, dp_rank, dp_size, _SHARDS, share_remainder)
        self.shards, self.block = list(shards), shuffle_block
        self.fields, self.name = fields or CaptionFields({}), name
        self.filters = filters or Filters([])
        self.failures = failures or ShardFailures(name or "default", len(shards), dp_size, 0.0, setting)
        self._image_filters = self.filters if self.filters.aspect else None

    def epoch_shards(self, epoch: int) -> list[int]:
        """This rank's shard indices of epoch `epoch` at its standard share."""
        return self.epoch_units(epoch)

    def describe(self, unit: int) -> str:
        return self.shards[unit]

    def _unit_items(self, epoch: int, unit: int, start: int):
        yield from enumerate(self._shard_items(epoch, unit, start), start=start + 1)

    def _shard_items(self, epoch: int, shard: int, start: int) -> Iterator[Item | BadSample]:
        """Records of one shard in emitted (block-shuffled) order, from emitted number `start` on."""
        first_block = start // self.block
        records = iter_tar_records(self.shards[shard], start=first_block * self.block)
        try:  # a shard that cannot be opened fails on the first record
            records = itertools.chain([next(records)], records)
        except StopIteration:
            return
        except ShardError as exc:
            yield self.failures.record(self.shards[shard], exc)
            return
        block_no, skip, done = first_block, start % self.block, False
        while not done:
            block = []
            for rec in records:
                block.append(rec)
                if isinstance(rec, BadSample) or len(block) == self.block:
                    break
            done = len(block) < self.block or isinstance(block[-1], BadSample)
            tail = [block.pop()] if block and isinstance(block[-1], BadSample) else []
            order = _rng(self.seed, _BLOCK, epoch, shard, block_no).permutation(len(block))
            for rec in ([block[i] for i in order] + tail)[skip:]:
                yield rec if isinstance(rec, BadSample) else self._item(rec, epoch, shard)
            block_no, skip = block_no + 1, 0

    def _item(self, rec, epoch: int, shard: int) -> Item | BadSample:
        where = f"{self.shards[shard]}:{rec.key}"
        try:
            meta = record_json(rec) if self.fields.uses_json or self.filters.json else None
            image, caption, language = self.fields.pick(rec, _rng(self.seed, _CAPTION, epoch, shard, rec.index), meta)
            self.filters.check_record(meta, caption, where)
        except BadSample as bad:
            return bad if bad.reason.startswith("filtered") else BadSample(bad.reason, where)
        aug_key = (self.seed, _AUG, epoch, shard, rec.index)
        return Item(key=where, caption=caption, encoded=image, aug_key=aug_key, source=self.name, language=language,
                    filters=self._image_filters)
