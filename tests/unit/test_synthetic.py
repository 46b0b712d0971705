"""The synthetic bilingual dataset: deterministic, captions ↔ scenes one to one, distinct eval scenes, shards."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.image import normalize_images
from m2megatron.data.synthetic import NUM_SCENES, Scene, SyntheticScenes, all_captions, caption

pytestmark = pytest.mark.unit


def test_deterministic_from_seed_and_index():
    a, b = SyntheticScenes(seed=7, image_size=32), SyntheticScenes(seed=7, image_size=32)
    for i in (0, 5, 999):
        x, y = a[i], b[i]
        assert np.array_equal(x.image, y.image) and x.caption == y.caption and x.scene == y.scene
        assert x.image.shape == (32, 32, 3) and x.image.dtype == np.uint8
    other = SyntheticScenes(seed=8, image_size=32)
    assert any(not np.array_equal(a[i].image, other[i].image) for i in range(4))
    assert SyntheticScenes(seed=7, image_size=64)[0].image.shape == (64, 64, 3)


def test_scene_ids_and_caption_space():
    assert NUM_SCENES == 384
    assert all(Scene.from_id(s).id == s for s in range(NUM_SCENES))
    owner: dict[str, int] = {}
    for s in range(NUM_SCENES):
        for lang, n in (("en", 12), ("zh", 6)):
            for t in range(n):
                c = caption(Scene.from_id(s), lang, t)
                assert owner.setdefault(c, s) == s, f"caption {c!r} describes two scenes"
    assert len(owner) == len(all_captions()) == NUM_SCENES * 18
    assert caption(Scene(0, 0, 0, 1), "en", 0) == "a red circle on the left"
    assert caption(Scene(0, 0, 0, 1), "zh", 0) == "左边有一个红色的圆形"
    assert caption(Scene(2, 3, 3, 2), "en", 1) == "there are two blue crosses at the bottom"


def test_languages():
    both = [SyntheticScenes(seed=1, image_size=32)[i].lang for i in range(40)]
    assert {"en", "zh"} == set(both)
    assert {SyntheticScenes(seed=1, image_size=32, language="zh")[i].lang for i in range(10)} == {"zh"}


def test_make_synthetic_shards_tool_matches_memory(tmp_path):
    res = subprocess.run([sys.executable, "tools/make_synthetic_shards.py", "--out", str(tmp_path), "--num-samples",
                          "10", "--per-shard", "4", "--seed", "5", "--image-size", "32"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]
    cfg = DataConfig(source="webdataset", shards=[str(tmp_path / "train-*.tar")], decoder="pil", prefetch=0)
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path / "tok")
    batch = next(build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=8, seed=0))
    mem = SyntheticScenes(seed=5, image_size=32)
    for key, cap, img in zip(batch["keys"], batch["captions"], batch["images"]):
        i = int(key.rsplit(":", 1)[1])
        assert cap == mem[i].caption
        ref = (mem[i].image.astype(np.float32) - 127.5) / 127.5
        got = normalize_images(img).numpy().transpose(1, 2, 0)  # the loader's uint8, normalized as on the device
        assert float(np.abs(got - ref).mean()) < 0.05  # JPEG q95
