"""Per-rank sample streams with a small, resumable position.

Each source turns (seed, epoch, dp_rank, dp_size) into a deterministic order and yields
`(item, position)` pairs forever (epoch after epoch). `position` is a small dict of ints: handing it
back to `stream(position)` continues with exactly the next item the uninterrupted stream would yield.

- synthetic / jsonl: a seeded permutation of all samples per epoch; rank r takes every dp_size-th
  sample from offset r, cut to the same length on every rank.
- webdataset: a seeded permutation of the shards per epoch; rank r takes every dp_size-th shard (the
  same count on every rank, so the leftover shards change from epoch to epoch). Inside a shard, records
  are read in tar order in blocks of `shuffle_block` and each block is permuted. Position = (epoch,
  shard slot, records emitted from that shard); resuming reopens the shard and skips whole records
  without reading their data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2megatron.config.base import ConfigError
from m2megatron.data.formats import JsonlItem, iter_tar_records, read_file, record_sample
from m2megatron.data.skips import BadSample
from m2megatron.data.synthetic import SyntheticScenes

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


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in key])


class IndexedSource:
    """Random-access samples (synthetic scenes, jsonl records) in a per-epoch seeded order."""

    def __init__(self, num_samples: int, seed: int, dp_rank: int, dp_size: int):
        if num_samples < dp_size:
            raise ConfigError(f"data: {num_samples} samples cannot feed {dp_size} data-parallel ranks")
        self.num_samples, self.seed, self.dp_rank, self.dp_size = num_samples, seed, dp_rank, dp_size
        self.per_rank = num_samples // dp_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        perm = _rng(self.seed, _ORDER, epoch).permutation(self.num_samples)
        return perm[self.dp_rank::self.dp_size][: self.per_rank]

    def start_position(self, epoch: int = 0) -> dict:
        return {"epoch": epoch, "index": 0}

    def stream(self, position: dict) -> Iterator[tuple[Item | BadSample, dict]]:
        epoch, index = int(position["epoch"]), int(position["index"])
        while True:
            order = self.epoch_order(epoch)
            for i in range(index, len(order)):
                sample = int(order[i])
                pos = {"epoch": epoch, "index": i + 1}
                try:
                    item = self.item(sample, epoch)
                except BadSample as bad:
                    item = bad
                yield item, pos
            epoch, index = epoch + 1, 0

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


class WebdatasetSource:
    kind = "webdataset"

    def __init__(self, shards: list[str], seed: int, dp_rank: int, dp_size: int, shuffle_block: int = 256):
        if len(shards) < dp_size:
            raise ConfigError(f"data.shards: {len(shards)} shard(s) cannot feed {dp_size} data-parallel ranks "
                              f"(each rank reads whole, distinct shards)")
        self.shards, self.seed, self.dp_rank, self.dp_size = list(shards), seed, dp_rank, dp_size
        self.block = shuffle_block
        self.per_rank = len(shards) // dp_size

    def epoch_shards(self, epoch: int) -> list[int]:
        perm = _rng(self.seed, _SHARDS, epoch).permutation(len(self.shards))
        return [int(s) for s in perm[self.dp_rank::self.dp_size][: self.per_rank]]

    def start_position(self, epoch: int = 0) -> dict:
        return {"epoch": epoch, "shard": 0, "record": 0}

    def stream(self, position: dict) -> Iterator[tuple[Item | BadSample, dict]]:
        epoch, slot, record = int(position["epoch"]), int(position["shard"]), int(position["record"])
        while True:
            shards = self.epoch_shards(epoch)
            for k in range(slot, len(shards)):
                for n, item in enumerate(self._shard_items(epoch, shards[k], record), start=record + 1):
                    yield item, {"epoch": epoch, "shard": k, "record": n}
                record = 0
            epoch, slot = epoch + 1, 0

    def _shard_items(self, epoch: int, shard: int, start: int) -> Iterator[Item | BadSample]:
        """Records of one shard in emitted (block-shuffled) order, from emitted number `start` on."""
        first_block = start // self.block
        records = iter_tar_records(self.shards[shard], start=first_block * self.block)
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
            image, captions = record_sample(rec)
        except BadSample as bad:
            return BadSample(bad.reason, where)
        pick = 0
        if len(captions) > 1:
            pick = int(_rng(self.seed, _CAPTION, epoch, shard, rec.index).integers(len(captions)))
        aug_key = (self.seed, _AUG, epoch, shard, rec.index)
        return Item(key=where, caption=captions[pick], encoded=image, aug_key=aug_key)
