"""The retrieval sets of the paper's tables in their public layouts: the Karpathy split (json and
CLIP_benchmark's txt) with five captions, the warning for a one-caption Flickr30K/COCO file, and COCO-CN's
two COCO splits under one image root."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from m2megatron.eval.inputs import BadInputs, read_caption_jsonl
from m2megatron.eval.karpathy import read_karpathy
from m2megatron.eval.retrieval import one_caption_warning
from m2megatron.eval.sets import EvalSet
from tests import eval_fakes

pytestmark = pytest.mark.unit


def test_karpathy_json_gives_the_test_split_with_every_caption(tmp_path):
    path = eval_fakes.write_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr30k-images")
    samples = read_karpathy(path, tmp_path / "flickr30k-images", "test", BadInputs())
    assert [len(s.captions) for s in samples] == [5] * 4 and samples[0].captions[4] == "image 0 caption 4"
    assert len(read_karpathy(path, tmp_path / "flickr30k-images", "train", BadInputs())) == 2
    coco = eval_fakes.write_karpathy(tmp_path / "dataset_coco.json", tmp_path / "coco", dataset="coco")
    assert read_karpathy(coco, tmp_path / "coco", "test", BadInputs())[0].image.endswith(
        "coco/val2014/COCO_val2014_000000000000.jpg")
    with pytest.raises(ValueError, match="--split 'dev' is not one of the Karpathy splits"):
        read_karpathy(path, tmp_path / "flickr30k-images", "dev", BadInputs())


def test_clip_benchmark_karpathy_txt_groups_the_captions_by_image(tmp_path):
    eval_fakes.jpeg(tmp_path / "1000.jpg", seed=1)
    eval_fakes.jpeg(tmp_path / "1001.jpg", seed=2)
    txt = tmp_path / "flickr30k_test_karpathy.txt"
    txt.write_text("image,caption\n" + "".join(f"{1000 + i // 5}.jpg,a dog, running {i}\n" for i in range(10)))
    samples = read_karpathy(txt, tmp_path, "test", BadInputs())
    assert [s.captions for s in samples] == [tuple(f"a dog, running {i}" for i in range(k, k + 5)) for k in (0, 5)]


def test_a_one_caption_flickr30k_file_is_warned_about_and_cn_sets_are_not():
    one = [["a caption"], ["another"]]
    spec = EvalSet(name="f30k", kind="jsonl", source=("data/f30k_caption_karpathy_test.jsonl",))
    assert "has 1 caption per image" in one_caption_warning(spec, one)
    assert one_caption_warning(spec, [["a", "b"], ["c"]]) is None
    assert one_caption_warning(EvalSet(name="c", kind="jsonl", source=("coco-cn_test.jsonl",)), one) is None
    assert one_caption_warning(EvalSet(name="s", kind="synthetic"), one) is None


def test_coco_cn_needs_both_coco_splits_under_one_root(tmp_path):
    jsonl = eval_fakes.write_coco_cn(tmp_path / "coco-cn_test.jsonl", tmp_path / "coco")
    assert len(read_caption_jsonl(jsonl, tmp_path / "coco", BadInputs())) == 6
    for image in (tmp_path / "coco" / "coco_dataset" / "val2014").iterdir():
        image.unlink()
    (tmp_path / "coco" / "coco_dataset" / "val2014").rmdir()
    with pytest.raises(ValueError, match="coco-cn_test.jsonl:2: image folder .*val2014 does not exist .*both COCO"):
        read_caption_jsonl(jsonl, tmp_path / "coco", BadInputs("skip"))  # a layout error is never skipped


def test_the_launcher_names_a_karpathy_set_by_file_and_split():
    from m2megatron.eval import retrieval

    args = SimpleNamespace(captions=None, karpathy="data/dataset_flickr30k.json", shards=None, wds=None,
                           image_root="data/flickr30k-images", name=None, split="test")
    spec = retrieval.set_from_args(args)
    assert (spec.kind, spec.name, spec.image_root) == ("karpathy", "dataset_flickr30k-test", "data/flickr30k-images")
    with pytest.raises(ValueError, match="give one of --captions, --karpathy"):
        retrieval.set_from_args(SimpleNamespace(**{**vars(args), "captions": "x.jsonl"}))
