"""Shards anywhere (m2megatron.data.shard_open): pipe: commands and fsspec URLs, read as streams; a shard that
cannot be read is a counted, logged skip until too many of a source's shards fail."""

from __future__ import annotations

import logging

import fsspec
import pytest

from m2megatron.config.data import DataConfig
from m2megatron.config.data_source import SourceConfig
from m2megatron.data.build import build_source, build_train_loader, resolve_tokenizer
from m2megatron.data.formats import ShardError
from m2megatron.data.shard_writer import write_synthetic_shards

pytestmark = pytest.mark.unit


def _records(shards: list[str], count: int, position=None):
    """(record keys, positions) of the first `count` items of DP rank 0 of 1 over `shards` (no decoding)."""
    cfg = DataConfig(source="webdataset", shards=shards, shuffle_block=2)
    src = build_source(cfg, image_size=16, dp_rank=0, dp_size=1, seed=3)
    stream = src.stream(position or src.start_position())
    got = [next(stream) for _ in range(count)]
    return [item.key.rsplit(":", 1)[1] for item, _ in got], [pos for _, pos in got]


def test_pipe_file_and_memory_urls_read_the_same_records_and_resume_inside_a_shard(tmp_path):
    paths = write_synthetic_shards(tmp_path, num_samples=15, per_shard=5, seed=2, image_size=16)
    mem = fsspec.filesystem("memory")
    for p in paths:
        mem.pipe(f"/shards/{p.name}", p.read_bytes())
    try:
        local, positions = _records([str(p) for p in paths], 15)
        forms = {"pipe": [f"pipe:cat {p}" for p in paths], "file": [f"file://{p}" for p in paths],
                 "memory": [f"memory://shards/{p.name}" for p in paths]}
        for name, shards in forms.items():
            keys, _ = _records(shards, 15)
            assert keys == local, name
            resumed, _ = _records(shards, 6, positions[8])  # mid-shard: reads on from the position
            assert resumed == local[9:15], name
        with pytest.raises(ShardError, match="nothing-here"):
            _records(["memory://shards/nothing-here.tar"], 1)
    finally:
        mem.rm("/shards", recursive=True)  # the memory filesystem lives as long as the process


def test_unreadable_shards_are_counted_skips_until_too_many_of_a_source_fail(tmp_path, caplog):
    paths = write_synthetic_shards(tmp_path, num_samples=12, per_shard=3, seed=2, image_size=16)  # 4 shards
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 40)
    shards = [str(p) for p in paths] + [str(tmp_path / "missing.tar"), "pipe:cat /nonexistent/x.tar",
                                        str(tmp_path / "broken.tar")]
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path / "tok")

    def config(fraction):
        src = SourceConfig(name="web", shards=shards, max_failed_shard_fraction=fraction)
        return DataConfig(source="webdataset", sources=[src], decoder="pil", num_workers=0, prefetch=0)

    with caplog.at_level(logging.WARNING, logger="m2megatron.data"):
        src = build_source(config(0.5), image_size=16, dp_rank=0, dp_size=1, seed=0)  # 3 of 7 fail: within half
        stream = src.stream(src.start_position())
        epoch = [item for item, _ in (next(stream) for _ in range(15))]  # 12 records and 3 failed shards
    assert sorted(getattr(i, "reason", "ok") for i in epoch) == ["ok"] * 12 + ["unreadable_shard"] * 3
    for name in ("missing.tar", "pipe:cat /nonexistent/x.tar", "broken.tar"):
        assert name in caplog.text
    ld = build_train_loader(config(0.5), tokenizer=tok, image_size=16, micro_batch_size=12, gpu=False)
    assert len(set(next(ld)["keys"])) == 12 and ld.skipped()["unreadable_shard"] >= 1
    ld.close()
    ld = build_train_loader(config(0.3), tokenizer=tok, image_size=16, micro_batch_size=12, gpu=False)
    with pytest.raises(ShardError, match=r"data.sources\[0\].shards: 3 shard\(s\) of source 'web' could not be read"):
        next(ld), next(ld)  # through epoch 0: the third failure is more than 0.3 of 7 shards
    ld.close()
