"""The fine-grained zero-shot sets built in: each reader on a small fake folder in its standard download
layout, the class names per language (maintained lists only) and the templates."""

from __future__ import annotations

import pytest

from m2megatron.config import RunConfig
from m2megatron.eval.finegrained import read_fine_grained
from m2megatron.eval.inputs import BadInputs
from m2megatron.eval.sets import EvalSet, read_set
from tests import eval_fakes

pytestmark = pytest.mark.unit


def _read(kind, root, lang="en", classes=None, templates="en"):
    cfg = RunConfig()
    if templates != "en":
        import dataclasses

        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, templates=templates))
    return read_set(EvalSet(name=kind, kind=kind, source=(str(root),), lang=lang, classes=classes), cfg, BadInputs())


def test_cub_reads_the_test_split_with_its_own_english_names(tmp_path):
    root = eval_fakes.write_cub(tmp_path / "CUB_200_2011")
    found = read_fine_grained("cub-200", root, BadInputs())
    assert [s.label for s in found.samples] == [0, 0, 1, 1, 2, 2]  # the is_training_image = 0 lines
    assert all("_0000.jpg" in s.image or "_0002.jpg" in s.image for s in found.samples)
    assert found.names == {"en": ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]}
    data = _read("cub-200", root)
    assert data.templates_source == "en imagenet1k" and len(data.templates) == 80
    with pytest.raises(ValueError, match="cub-200: no maintained zh class names .* --classes FILE"):
        _read("cub-200", root, lang="zh")
    names = tmp_path / "cub_zh.txt"
    names.write_text("".join(f"{folder}\t鸟{i}\n" for i, folder in enumerate(eval_fakes.CUB_FOLDERS)))
    zh = _read("cub-200", root, lang="zh", classes=str(names))
    assert zh.class_names == ["鸟0", "鸟1", "鸟2"] and zh.templates[0] == "{}的照片。"
    (root / "images" / eval_fakes.CUB_FOLDERS[0] / "Black_footed_Albatross_0000.jpg").unlink()
    with pytest.raises(ValueError, match="images.txt:1: image file .* does not exist"):
        read_fine_grained("cub-200", root, BadInputs())
    assert len(read_fine_grained("cub-200", root, BadInputs("skip")).samples) == 5


@pytest.mark.parametrize("list_format", ["mat", "txt"])
def test_stanford_dogs_names_come_from_the_imagenet_synsets_in_both_languages(tmp_path, list_format):
    root = eval_fakes.write_dogs(tmp_path / "dogs", list_format=list_format)
    found = read_fine_grained("stanford-dogs", root, BadInputs())
    assert [s.label for s in found.samples] == [0, 0, 1, 1, 2, 2]
    assert found.names["en"] == ["Chihuahua", "Japanese Chin", "Maltese"]
    assert found.names["zh"] == ["吉娃娃", "日本狆犬", "马尔济斯犬"]
    assert _read("stanford-dogs", root, lang="zh").class_names == found.names["zh"]


@pytest.mark.parametrize("layout", ["devkit", "folders"])
def test_stanford_cars_in_the_devkit_and_the_folder_layout(tmp_path, layout):
    root = eval_fakes.write_cars(tmp_path / "cars", layout=layout)
    found = read_fine_grained("stanford-cars", root, BadInputs())
    assert [s.label for s in found.samples] == [0, 0, 1, 1, 2, 2]
    assert found.names == {"en": list(eval_fakes.CAR_NAMES)}
    data = _read("stanford-cars", root)
    assert data.templates_source == "en cars" and data.templates[0] == "a photo of a {}."
    template_file = tmp_path / "t.txt"
    template_file.write_text("一张{}的照片\n")
    assert _read("stanford-cars", root, templates=str(template_file)).templates == ["一张{}的照片"]


def test_missing_layouts_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for kind, message in (("cub-200", "classes.txt does not exist"), ("stanford-dogs", "Images does not exist"),
                          ("stanford-cars", "neither cars_test_annos_withlabels.mat")):
        with pytest.raises(ValueError, match=message):
            read_fine_grained(kind, tmp_path / "empty", BadInputs())
