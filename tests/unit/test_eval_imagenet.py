"""ImageNet-1k built in: names, templates and synsets from the installed clip-benchmark, both val layouts,
and `python -m m2megatron.eval.zeroshot --dataset imagenet-1k` on a small fake ImageNet folder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from m2megatron.eval import imagenet
from m2megatron.eval.inputs import BadInputs

pytestmark = pytest.mark.unit
SYNSET_INDICES = (0, 1, 2, 500, 999)  # a few synsets, in the standard (sorted) order


def _jpeg(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


@pytest.fixture
def fake_imagenet(tmp_path):
    root = tmp_path / "val"
    for n, index in enumerate(SYNSET_INDICES):
        for k in range(2):
            _jpeg(root / imagenet.synsets()[index] / f"ILSVRC2012_val_{10 * n + k:08d}.JPEG", seed=10 * n + k)
    return root


def test_package_lists_are_the_standard_imagenet_1k_lists():
    synsets = imagenet.synsets()
    assert len(synsets) == 1000 and synsets[0] == "n01440764" and synsets[-1] == "n15075141"
    assert list(synsets) == sorted(synsets)
    en, zh = imagenet.class_names("en"), imagenet.class_names("zh")
    assert (en[0], en[1], en[999]) == ("tench", "goldfish", "toilet paper")
    assert (zh[0], zh[1], zh[999]) == ("丁鲷", "金鱼", "卫生纸")
    assert len(imagenet.package_templates("en")) == len(imagenet.package_templates("zh")) == 80
    assert imagenet.package_templates("zh")[0] == "{c}的照片。"
    with pytest.raises(ValueError, match="'fr' is not 'en' or 'zh'"):
        imagenet.class_names("fr")


def test_synset_folders_give_standard_labels_even_for_a_subset(fake_imagenet):
    samples = imagenet.read_imagenet(fake_imagenet, None, BadInputs())
    assert [s.label for s in samples] == [i for i in SYNSET_INDICES for _ in range(2)]
    (fake_imagenet / "n99999999").mkdir()
    with pytest.raises(ValueError, match="not ImageNet-1k synsets: \\['n99999999'\\]"):
        imagenet.read_imagenet(fake_imagenet, None, BadInputs())


def test_flat_layout_with_a_labels_file(tmp_path):
    flat = tmp_path / "flat"
    for i in range(1, 5):
        _jpeg(flat / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG n01443537\n"
                                      "ILSVRC2012_val_00000003.JPEG 999\nILSVRC2012_val_00000005.JPEG 3\n")
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000004.JPEG: no label in"):
        imagenet.read_imagenet(flat, tmp_path / "val.txt", BadInputs())
    bad = BadInputs("skip")
    samples = imagenet.read_imagenet(flat, tmp_path / "val.txt", bad)
    assert [s.label for s in samples] == [65, 1, 999]
    assert bad.counts() == {"missing_image": 1, "unlabeled_image": 1}
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n"
                                                   "ILSVRC2012_val_00000004,n15075141 1 2 3 4\n")
    assert imagenet.read_labels_file(tmp_path / "LOC_val_solution.csv") == {"ILSVRC2012_val_00000004": 999}
    (tmp_path / "devkit.txt").write_text("490\n361\n")
    with pytest.raises(ValueError, match=r"devkit.txt:1: expected '<image file> <label>'"):
        imagenet.read_imagenet(flat, tmp_path / "devkit.txt", BadInputs())
    with pytest.raises(ValueError, match="needs a labels file"):
        imagenet.read_imagenet(flat, None, BadInputs())


def test_lang_picks_the_package_names_and_templates(fake_imagenet, tmp_path):
    from m2megatron.config import RunConfig
    from m2megatron.eval.sets import EvalSet, read_set

    spec = EvalSet(name="in", kind="imagenet", source=(str(fake_imagenet),), lang="zh")
    data = read_set(spec, RunConfig(), BadInputs())
    assert data.class_names == imagenet.class_names("zh") and data.templates[0] == "{}的照片。"
    assert len(data.templates) == 80 and data.templates_source == "zh"
    (tmp_path / "one.txt").write_text("一张{}的照片\n")
    cfg = RunConfig()
    cfg.eval.templates = str(tmp_path / "one.txt")
    assert read_set(spec, cfg, BadInputs()).templates == ["一张{}的照片"]


@pytest.mark.parametrize("lang, template", [("en", "a photo of a {c}."), ("zh", "{c}的照片。")])
def test_zeroshot_launcher_runs_imagenet_1k_on_a_fake_val_folder(fake_imagenet, tmp_path, monkeypatch, lang,
                                                                 template):
    from m2megatron.data.sp_train import synthetic_tokenizer_path
    from m2megatron.eval import zeroshot

    (tmp_path / "one.txt").write_text(template + "\n", encoding="utf-8")  # 1000 prompts instead of 80 000
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "zeroshot", "--dataset", "imagenet-1k", "--lang", lang, "--data", str(fake_imagenet),
        "--checkpoint-format", "none", "--tokenizer", str(synthetic_tokenizer_path(tmp_path)), "--out", str(out),
        f"--eval.templates={tmp_path / 'one.txt'}", "--eval.batch_size=256", "--eval.num_workers=1"])
    assert zeroshot.main() == 0
    (entry,) = json.loads((out / "results.json").read_text())
    assert entry["name"] == f"imagenet-1k-{lang}" and entry["task"] == "zeroshot"
    assert (entry["num_images"], entry["num_classes"], entry["num_templates"]) == (10, 1000, 1)
    assert 0 <= entry["metrics"]["top1"] <= entry["metrics"]["top5"] <= 100
