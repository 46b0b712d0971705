"""Sample filters (m2megatron.data.filters): json metadata predicates, caption length, aspect ratio from the
image header; each a counted skip reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m2megatron.config.base import ConfigError
from m2megatron.config.data import DataConfig
from m2megatron.config.data_source import SourceConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.shard_writer import encode_jpeg, write_shard

pytestmark = pytest.mark.unit

PAPER = ["caption_chars >= 5", "aspect_ratio <= 3", "json:similarity >= 0.25"]


def _record(i: int, caption: str, similarity, size=(24, 24), status="success"):
    pixels = np.full((size[1], size[0], 3), 40 + i, dtype=np.uint8)
    meta = {"caption": caption, "status": status, **({} if similarity is None else {"similarity": similarity})}
    return f"{i:09d}", {"jpg": encode_jpeg(pixels), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def test_the_papers_filters_are_counted_skips(tmp_path):
    records = [_record(0, "a red circle", 0.31), _record(1, "tiny", 0.40), _record(2, "a wide one", 0.30, (80, 20)),
               _record(3, "low clip score", 0.10), _record(4, "no score at all", None), _record(5, "a tall one", 0.5,
                                                                                              (20, 60)),
               _record(6, "failed download", 0.9, status="failed_to_download"), _record(7, "  ok  ok  ", 0.25)]
    write_shard(tmp_path / "s-0.tar", records)
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path / "tok")
    cfg = DataConfig(source="webdataset", shards=[str(tmp_path / "s-0.tar")], decoder="pil", num_workers=0,
                     prefetch=0, shuffle_block=1, filters=PAPER)
    cfg.sources, cfg.shards = [SourceConfig(name="web", shards=cfg.shards, filters=["json:status == success"])], []
    loader = build_train_loader(cfg, tokenizer=tok, image_size=16, micro_batch_size=3, gpu=False)
    keys = [k.rsplit(":", 1)[1] for k in next(loader)["keys"]]
    assert keys == ["000000000", "000000005", "000000007"]  # 3:1 is within 3; "ok  ok" has 6 characters
    assert loader.skipped() == {"filtered_aspect_ratio": 1, "filtered_caption_length": 1, "filtered_metadata": 3}
    loader.close()


@pytest.mark.parametrize("bad, message", [
    ("similarity >= 0.25", "is not a filter"),
    ("caption_chars >= five", "compares with a number"),
    ("json:lang > en", "only with == or !="),
])
def test_a_bad_filter_is_a_one_line_error_naming_the_setting(bad, message):
    with pytest.raises(ConfigError, match=rf"^data.filters\[1\]: .*{message}"):
        DataConfig(filters=["caption_chars >= 5", bad]).validate()
    with pytest.raises(ConfigError, match=r"^data.sources\[0\].filters\[0\]: "):
        DataConfig(source="webdataset", sources=[SourceConfig(name="a", shards=["x"], filters=[bad])]).validate()
