"""Bad eval inputs give a clear error naming the file/line, or (eval.on_bad_input=skip) a counted skip."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from m2megatron.eval.inputs import (
    BadInputs,
    read_caption_jsonl,
    read_caption_shards,
    read_image_folder,
    read_label_shards,
)
from m2megatron.eval.prompts import load_class_names, load_templates

pytestmark = pytest.mark.unit


def _png(path=None, colour=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def jsonl(tmp_path):
    _png(tmp_path / "img" / "a.jpg")
    _png(tmp_path / "img" / "b.jpg")
    lines = [json.dumps({"image": "a.jpg", "caption": ["one", "two"]}),
             "{not json",
             json.dumps({"image": "missing.jpg", "caption": ["x"]}),
             json.dumps({"image": "b.jpg", "caption": []}),
             "",
             json.dumps({"image": "b.jpg", "caption": "single string"})]
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, tmp_path / "img"


@pytest.mark.parametrize("line, message", [(2, "malformed JSON"), (3, "does not exist"), (4, "empty caption list")])
def test_each_bad_jsonl_line_is_an_error_naming_file_and_line(jsonl, line, message, tmp_path):
    path, root = jsonl
    lines = path.read_text().splitlines()
    good = [lines[0], lines[line - 1]]
    one_bad = tmp_path / "one_bad.jsonl"
    one_bad.write_text("\n".join(good) + "\n")
    with pytest.raises(ValueError, match=rf"one_bad\.jsonl:2: .*{message}"):
        read_caption_jsonl(one_bad, root, BadInputs("error"))


def test_skip_policy_counts_every_bad_line(jsonl):
    path, root = jsonl
    bad = BadInputs("skip")
    samples = read_caption_jsonl(path, root, bad)
    assert [s.captions for s in samples] == [("one", "two"), ("single string",)]
    assert [s.where for s in samples] == [f"{path}:1", f"{path}:6"]
    assert bad.counts() == {"bad_caption_line": 2, "missing_image": 1}


def test_a_file_with_no_usable_sample_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match="no usable samples"):
        read_caption_jsonl(path, tmp_path / "img", BadInputs("skip"))
    with pytest.raises(ValueError, match="does not exist"):
        read_caption_jsonl(tmp_path / "nope.jsonl", tmp_path / "img", BadInputs())


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_caption_and_label_shards(tmp_path):
    _tar(tmp_path / "c-000.tar", {"k1.png": _png(), "k1.json": json.dumps({"caption": ["a", "b"]}).encode(),
                                   "k2.png": _png(), "k3.png": _png(), "k3.txt": b"c"})
    bad = BadInputs("skip")
    samples = read_caption_shards([str(tmp_path / "c-{000..000}.tar")], bad)
    assert [s.captions for s in samples] == [("a", "b"), ("c",)]
    assert bad.counts() == {"missing_caption": 1}
    with pytest.raises(ValueError, match="k2"):
        read_caption_shards([str(tmp_path / "c-000.tar")], BadInputs("error"))
    _tar(tmp_path / "l.tar", {"k1.png": _png(), "k1.cls": b"2", "k2.png": _png(), "k2.cls": b"x"})
    bad = BadInputs("skip")
    assert [s.label for s in read_label_shards(str(tmp_path / "l.tar"), bad)] == [2]
    assert bad.counts() == {"bad_label": 1}


def test_image_folder_and_class_files(tmp_path):
    for cls in ("dog", "cat"):
        _png(tmp_path / "imgs" / cls / "1.png")
    folders, samples = read_image_folder(tmp_path / "imgs")
    assert folders == ["cat", "dog"] and [s.label for s in samples] == [0, 1]
    (tmp_path / "names.txt").write_text("cat\tKatze\ndog\tHund\n")
    assert load_class_names(tmp_path / "names.txt", folders=folders) == ["Katze", "Hund"]
    (tmp_path / "names.json").write_text(json.dumps(["猫", "狗"]))
    assert load_class_names(tmp_path / "names.json", folders=folders) == ["猫", "狗"]
    (tmp_path / "names.csv").write_text("cat,dog\n")
    with pytest.raises(ValueError, match=r"unknown class file format .*names\.csv"):
        load_class_names(tmp_path / "names.csv", folders=folders)
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="lists 3 names but the image folder has 2"):
        load_class_names(tmp_path / "three.txt", folders=folders)
    (tmp_path / "gap.txt").write_text("a\n\nc\n")
    with pytest.raises(ValueError, match=r"gap\.txt:2: empty class name"):
        load_class_names(tmp_path / "gap.txt")
    with pytest.raises(ValueError, match="has label 4 but"):
        load_class_names(tmp_path / "three.txt", num_labels=5)


def test_builtin_templates_come_from_clip_benchmark_and_bad_template_files_are_errors(tmp_path):
    en, zh = load_templates("en"), load_templates("zh")
    assert len(en) == 80 and "a photo of a {}." in en
    assert len(zh) == 80 and zh[0] == "{}的照片。" and all(t.count("{}") == 1 for t in zh)
    (tmp_path / "t.txt").write_text("a {} photo\nCLIP_benchmark's {c} slot\nno placeholder\n")
    with pytest.raises(ValueError, match="template 3"):
        load_templates(str(tmp_path / "t.txt"))
    (tmp_path / "ok.txt").write_text("a {} photo\na {c} drawing\n")
    assert load_templates(str(tmp_path / "ok.txt")) == ["a {} photo", "a {} drawing"]


def test_synthetic_held_out_set_is_distinct_scenes_never_drawn_by_training():
    import numpy as np

    from m2megatron.config.data import DataConfig
    from m2megatron.data.synthetic import NUM_SCENES, SyntheticScenes
    from m2megatron.eval.inputs import synthetic_held_out

    images, captions = synthetic_held_out(seed=3, image_size=32, language="both", num_samples=256)
    scenes = SyntheticScenes(seed=3, image_size=32, split="eval")
    assert len({scenes.scene(i) for i in range(256)}) == 256
    assert len(images) == 256 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    assert all(len(c) == 1 for c in captions) and {scenes[i].lang for i in range(256)} == {"en", "zh"}
    train = SyntheticScenes(seed=3, image_size=32)
    assert not any(np.array_equal(train[i].image, images[0]) for i in range(50))
    with pytest.raises(ValueError, match="distinct"):
        synthetic_held_out(seed=3, image_size=32, language="both", num_samples=NUM_SCENES + 1)
    with pytest.raises(ValueError):
        DataConfig(synthetic_eval_samples=NUM_SCENES + 1).validate()


def test_jsonl_set_defaults_its_image_root_to_the_jsonl_folder_and_keeps_raw_captions(tmp_path):
    from m2megatron.config import RunConfig
    from m2megatron.eval.batches import prepare_texts
    from m2megatron.eval.sets import EvalSet, read_set

    _png(tmp_path / "imgs" / "a.jpg")
    record = {"image": "imgs/a.jpg", "caption": ["A \u201cQuoted\u201d Cat"]}
    (tmp_path / "set.jsonl").write_text(json.dumps(record) + "\n")
    data = read_set(EvalSet(name="set", kind="jsonl", source=(str(tmp_path / "set.jsonl"),)), RunConfig(), BadInputs())
    assert data.task == "retrieval" and data.images == [str(tmp_path / "imgs" / "a.jpg")]
    assert data.captions == [["A \u201cQuoted\u201d Cat"]]  # the reference preprocessing is applied when scoring
    assert prepare_texts(data.captions[0], True) == ['a "quoted" cat']
