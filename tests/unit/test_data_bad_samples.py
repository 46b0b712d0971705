"""Bad samples are skipped, counted by reason and logged; every good sample still arrives."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from m2megatron.config.base import ConfigError
from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_source, build_train_loader, resolve_tokenizer
from m2megatron.data.formats import ShardError
from m2megatron.data.shard_writer import encode_jpeg, write_shard
from m2megatron.data.synthetic import SyntheticScenes

pytestmark = pytest.mark.unit

EXPECTED = {"corrupt_image": 1, "truncated_image": 1, "empty_image": 1, "missing_caption": 1, "empty_caption": 1,
            "bad_utf8": 1, "extreme_size": 1, "missing_image": 1, "bad_json": 1, "truncated_tar": 1,
            "decode_error": 1}


def corrupt_png(seed: int = 0) -> bytes:
    """A PNG whose header is fine (it passes the probe) but whose pixel data is broken: fails to decode."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 8
    data[start:start + 50] = bytes(b ^ 0x5A for b in data[start:start + 50])
    return bytes(data)


def _good(scenes, i):
    s = scenes[i]
    return f"good{i:02d}", {"jpg": encode_jpeg(s.image), "txt": s.caption.encode()}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    scenes = SyntheticScenes(seed=1, image_size=32)
    jpg = encode_jpeg(scenes[0].image)
    txt = b"a red circle"
    bad = [
        ("corrupt", {"jpg": bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "txt": txt}),
        ("truncjpeg", {"jpg": jpg[: len(jpg) // 2], "txt": txt}),
        ("zerobyte", {"jpg": b"", "txt": txt}),
        ("nocaption", {"jpg": jpg}),
        ("emptycaption", {"jpg": jpg, "txt": b"  \n"}),
        ("badutf8", {"jpg": jpg, "txt": b"\xff\xfe caption \xfa"}),
        ("extreme", {"jpg": encode_jpeg(np.zeros((4, 400, 3), np.uint8)), "txt": txt}),
        ("noimage", {"txt": txt}),
        ("badjson", {"jpg": jpg, "json": b"{not json"}),
    ]
    records = []
    for i, rec in enumerate(bad):  # interleave: good, bad, good, bad, …, good
        records += [_good(scenes, i), rec]
    records.append(("badpng", {"png": corrupt_png(), "txt": txt}))  # passes the probe, fails to decode
    s = scenes[9]
    records.append(("good09", {"jpg": encode_jpeg(s.image), "json": json.dumps({"caption": s.caption}).encode()}))
    write_shard(root / "a.tar", records)
    write_shard(root / "b.tar", [_good(scenes, i) for i in range(10, 15)])
    with tarfile.open(root / "b.tar") as tf:  # cut b.tar in the middle of good14's image
        cut = next(m for m in tf.getmembers() if m.name == "good14.jpg")
        cut = cut.offset_data + cut.size // 2
    data = (root / "b.tar").read_bytes()
    (root / "b.tar").write_bytes(data[:cut])
    (root / "broken.tar").write_bytes(b"this is not a tar file at all" * 40)
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path_factory.mktemp("tok"))


def _seed_with_truncated_shard_first(cfg):
    """A seed whose epoch-0 order reads b.tar first, so b.tar's truncation is seen before a.tar's last good
    sample and the counts after the last good sample of the epoch are complete."""
    for seed in range(100):
        src = build_source(cfg, image_size=32, dp_rank=0, dp_size=1, seed=seed)
        if src.shards[src.epoch_shards(0)[0]].endswith("b.tar"):
            return seed
    raise AssertionError("no seed found")


@pytest.mark.parametrize("decoder,workers", [("pil", 0), ("pil", 2), ("dali", 1)])
def test_every_bad_kind_is_counted_and_good_ones_arrive(bad_shards, tok, decoder, workers, caplog):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = DataConfig(source="webdataset", shards=[str(bad_shards / "a.tar"), str(bad_shards / "b.tar")],
                     decoder=decoder, num_workers=workers, shuffle_block=1, prefetch=0)
    loader = build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=7,
                                seed=_seed_with_truncated_shard_first(cfg), gpu=False)
    with caplog.at_level(logging.WARNING, logger="m2megatron.data"):
        batches = [next(loader), next(loader)]  # 14 good samples = one epoch
    keys = sorted(k.rsplit(":", 1)[1] for b in batches for k in b["keys"])
    assert keys == [f"good{i:02d}" for i in range(14)]
    assert loader.skipped() == EXPECTED
    assert loader.state_dict()["skipped"] == EXPECTED
    assert "skipped sample" in caplog.text and "badutf8" in caplog.text
    assert all(b["images"].shape == (7, 3, 32, 32) for b in batches)
    if decoder == "dali":
        assert loader.decoder.fallbacks >= 1  # the broken PNG failed a DALI chunk: decoded again with PIL
    loader.close()


def test_unopenable_shard_is_an_error_naming_it(bad_shards, tok):
    cfg = DataConfig(source="webdataset", shards=[str(bad_shards / "broken.tar")], decoder="pil", num_workers=0)
    loader = build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=2)
    with pytest.raises(ShardError, match="broken.tar"):
        next(loader)
    # A missing shard is found when it is opened (no rank stats every shard up front): same error, naming it.
    missing = build_train_loader(DataConfig(source="webdataset", shards=[str(bad_shards / "missing.tar")],
                                            decoder="pil", num_workers=0), tokenizer=tok, image_size=32,
                                 micro_batch_size=2)
    with pytest.raises(ShardError, match="missing.tar"):
        next(missing)
    with pytest.raises(ConfigError, match="matches no file"):
        build_train_loader(DataConfig(source="webdataset", shards=[str(bad_shards / "nothing-*.tar")]),
                           tokenizer=tok, image_size=32, micro_batch_size=2)
