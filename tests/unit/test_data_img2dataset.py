"""img2dataset output as it writes it: .jpg/.txt/.json members with its metadata keys, .parquet and
_stats.json beside the tars."""

from __future__ import annotations

import pytest

from m2megatron.config.data import DataConfig
from m2megatron.config.data_source import SourceConfig
from m2megatron.data.build import build_source
from m2megatron.data.formats import expand_shards
from m2megatron.data.shard_stats import read_source_stats
from m2megatron.data.shard_writer import write_img2dataset_shards
from m2megatron.data.skips import BadSample

pytestmark = pytest.mark.unit


def test_img2dataset_folders_read_as_a_source_with_its_size_from_the_stats(tmp_path):
    folder = write_img2dataset_shards(tmp_path / "laion", num_shards=3, per_shard=10, zh_field=True, failed_every=5)
    shards = expand_shards([str(folder / "*")])  # the glob keeps the tars, not .parquet or _stats.json
    assert [s.rsplit("/", 1)[1] for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    stats = read_source_stats(shards)
    assert (stats.with_stats, stats.samples, stats.samples_per_epoch()) == (3, 24, 24)
    assert read_source_stats(shards, limit=1).samples_per_epoch() == 8
    assert read_source_stats([f"pipe:cat {s}" for s in shards]).samples_per_epoch() is None

    src = SourceConfig(name="laion", shards=[str(folder / "*")], language="en",
                       captions={"json:caption": 0.5, "json:caption_zh": 0.5},
                       caption_languages={"json:caption_zh": "zh"},
                       filters=["json:similarity >= 0.25", "json:status == success"])
    mix = build_source(DataConfig(source="webdataset", sources=[src]), image_size=16, dp_rank=0, dp_size=1, seed=0)
    stream = mix.stream(mix.start_position())
    items = [item for item, _ in (next(stream) for _ in range(24))]
    good = [i for i in items if not isinstance(i, BadSample)]
    assert {i.reason for i in items if isinstance(i, BadSample)} == {"filtered_metadata"}  # similarity < 0.25
    assert len(good) == 24 - sum(1 for n in range(30) if n % 5 != 4 and n % 7 < 2)
    assert {i.language for i in good} == {"en", "zh"} and all(i.source == "laion" for i in good)
    assert all(i.key.split(":")[1][:5] in i.key.split(":")[0] for i in good)  # keys are shard id + index
