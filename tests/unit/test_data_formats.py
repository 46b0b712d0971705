"""Readers: the reference jsonl format (eval sets and training), image folders, shard name expansion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m2megatron.config.base import ConfigError
from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.formats import ShardError, expand_shards, read_jsonl, scan_image_folder
from m2megatron.data.shard_writer import encode_jpeg
from m2megatron.data.synthetic import SyntheticScenes

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def jsonl_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonl")
    scenes = SyntheticScenes(seed=4, image_size=40)
    (root / "imgs").mkdir()
    lines = []
    for i in range(6):
        (root / "imgs" / f"{i}.jpg").write_bytes(encode_jpeg(scenes[i].image))
        caps = list(scenes.captions(i).values()) if i % 2 else [scenes[i].caption.upper() + " \u201cq\u201d"]
        lines.append(json.dumps({"image": f"imgs/{i}.jpg", "caption": caps}, ensure_ascii=False))
    lines.append(json.dumps({"image": "imgs/missing.jpg", "caption": ["a lost image"]}))
    (root / "set.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_reference_jsonl_files_parse(reference_dir):
    items = read_jsonl(reference_dir / "coco-cn_test.jsonl")
    assert len(items) == 1000 and sum(len(i.captions) for i in items) == 1053
    assert items[0].image.startswith("coco_dataset/train2014/")


def test_jsonl_training_source_skips_missing_images(jsonl_set, tmp_path):
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path)
    cfg = DataConfig(source="jsonl", jsonl=str(jsonl_set / "set.jsonl"), decoder="pil", prefetch=0)
    loader = build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=6, seed=1)
    batch = next(loader)
    assert sorted(batch["keys"]) == [f"imgs/{i}.jpg" for i in range(6)]
    next(loader)  # 12 good samples > one epoch of 6 good + 1 missing: the missing one was passed
    assert loader.skipped().get("missing_image", 0) >= 1


def test_image_folder_scan(tmp_path):
    scenes = SyntheticScenes(seed=0, image_size=24)
    for cls, n in (("dog", 2), ("cat", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.jpg").write_bytes(encode_jpeg(scenes[i].image))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    classes, items = scan_image_folder(tmp_path)
    assert classes == ["cat", "dog"] and [label for _, label in items] == [0, 0, 0, 1, 1]
    with pytest.raises(ShardError, match="no class subfolders"):
        scan_image_folder(tmp_path / "dog")


def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    assert expand_shards([str(tmp_path / "s-{000..002}.tar")]) == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert len(expand_shards([str(tmp_path / "*.tar")])) == 3
    assert np.array_equal(expand_shards(["a{1..2}b{3..4}"]), ["a1b3", "a1b4", "a2b3", "a2b4"])
    (tmp_path / "list.txt").write_text("# the shards\ns-000.tar\n\n/abs/s-9.tar\n")
    assert expand_shards([f"@{tmp_path / 'list.txt'}"]) == [str(tmp_path / "s-000.tar"), "/abs/s-9.tar"]
    with pytest.raises(ConfigError, match="shard list"):
        expand_shards([f"@{tmp_path / 'nolist.txt'}"])
