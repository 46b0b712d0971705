"""The fine-grained zero-shot sets of the paper, built in as ImageNet-1k is: CUB-200-2011, Stanford Dogs and
Stanford Cars, read from their standard download layouts (docs/REPRODUCE.md).

Class names, by language:
- English: CUB's own `classes.txt` names ("001.Black_footed_Albatross" → "Black footed Albatross"),
  Stanford Cars' own `cars_meta.mat` names (what torchvision and CLIP_benchmark read), and for Stanford
  Dogs, whose 120 classes are ImageNet synsets, clip-benchmark's ImageNet-1k names of those synsets;
- Chinese: only Stanford Dogs has a maintained list (clip-benchmark's ImageNet-1k Chinese names, i.e.
  cn-clip's). No maintained package ships Chinese CUB or Cars names, so `--lang zh` needs a class-name
  file of the user's (`--classes FILE`); we never ship machine-made translations.
Templates: clip-benchmark's `cars` templates for Cars in English, else its ImageNet-1k templates of the
language (the paper does not publish its prompts).

The test split only: CUB's `train_test_split.txt` 0-lines, Dogs' `lists/test_list.mat` (or a text list),
Cars' `cars_test_annos_withlabels.mat` or the `test/<class name>/` folder layout. `.mat` files are read
with scipy, imported only when such a file is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from m2megatron.data.formats import IMAGE_SUFFIXES
from m2megatron.eval import imagenet
from m2megatron.eval.inputs import BadInputs, Sample

DATASETS = ("cub-200", "stanford-dogs", "stanford-cars")


@dataclass
class FineGrainedSet:
    samples: list[Sample]
    class_keys: list[str] | None
    """The names a `folder<TAB>name` class file is keyed by (class folders); None: label indices."""
    names: dict[str, list[str]]
    """Class names in label order per language that has a maintained list ('en', 'zh')."""


def _load_mat(path: Path) -> dict:
    try:
        import scipy.io
    except ImportError:
        raise ValueError(f"{path}: reading .mat files needs scipy (pip install scipy), or use the text/folder "
                         "layout (docs/REPRODUCE.md)") from None
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable .mat file ({exc})") from None


def _mat_field(mat: dict, key: str, path: Path):
    import numpy as np

    if key not in mat:
        raise ValueError(f"{path}: has no {key!r} (expected the dataset's own file)")
    return np.atleast_1d(mat[key])


def _id_lines(path: Path) -> dict[str, str]:
    """{first field: rest} of CUB's '<id> <value>' files."""
    if not path.is_file():
        raise ValueError(f"cub-200: {path} does not exist (expected the CUB_200_2011 folder: images/, images.txt, "
                         "train_test_split.txt, classes.txt)")
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"cub-200: {path}:{number}: expected '<id> <value>'")
            out[parts[0]] = parts[1].strip()
    return out


def _image(path: Path, where: str, label: int, bad: BadInputs) -> Sample | None:
    if not path.is_file():
        bad.handle("missing_image", f"{where}: image file {path} does not exist")
        return None
    return Sample(image=str(path), where=where, label=label)


def _present(samples: list[Sample | None]) -> list[Sample]:
    return [s for s in samples if s is not None]


def read_cub(root: Path, bad: BadInputs) -> FineGrainedSet:
    """CUB_200_2011/: images.txt, train_test_split.txt (0 = test), classes.txt, images/<class folder>/…"""
    classes = _id_lines(root / "classes.txt")
    folders = [classes[k] for k in sorted(classes, key=int)]
    index = {f: i for i, f in enumerate(folders)}
    images, split = _id_lines(root / "images.txt"), _id_lines(root / "train_test_split.txt")
    samples = []
    for image_id, relative in sorted(images.items(), key=lambda kv: int(kv[0])):
        if split.get(image_id) != "0":
            continue
        folder = relative.split("/")[0]
        if folder not in index:
            raise ValueError(f"cub-200: {root / 'images.txt'}: image {image_id} is in {folder!r}, not a class of "
                             f"{root / 'classes.txt'}")
        samples.append(_image(root / "images" / relative, f"{root / 'images.txt'}:{image_id}", index[folder], bad))
    english = [f.split(".", 1)[-1].replace("_", " ") for f in folders]
    return FineGrainedSet(_present(samples), folders, {"en": english})


def _dogs_test_list(root: Path) -> list[str]:
    """The relative image paths of Stanford Dogs' test split: lists/test_list.mat, or lists/test_list.txt."""
    mat, txt = root / "lists" / "test_list.mat", root / "lists" / "test_list.txt"
    if mat.is_file():
        return [str(p) for p in _mat_field(_load_mat(mat), "file_list", mat)]
    if txt.is_file():
        return [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"stanford-dogs: {root} has neither lists/test_list.mat nor lists/test_list.txt (one "
                     "'n02085620-Chihuahua/n02085620_2650.jpg' path a line)")


def read_dogs(root: Path, bad: BadInputs) -> FineGrainedSet:
    """Stanford Dogs: Images/<synset>-<name>/…jpg and lists/test_list.mat; labels = sorted class folders."""
    images = root / "Images"
    if not images.is_dir():
        raise ValueError(f"stanford-dogs: {images} does not exist (expected Images/n02085620-Chihuahua/…)")
    folders = sorted(p.name for p in images.iterdir() if p.is_dir())
    index = {f: i for i, f in enumerate(folders)}
    samples = []
    for number, relative in enumerate(_dogs_test_list(root), start=1):
        folder = relative.split("/")[0]
        if folder not in index:
            raise ValueError(f"stanford-dogs: test list entry {number} {relative!r}: no class folder {images / folder}")
        samples.append(_image(images / relative, f"{root / 'lists'}:{number}", index[folder], bad))
    synset_index = {w: i for i, w in enumerate(imagenet.synsets())}
    synsets = [f.split("-", 1)[0] for f in folders]
    if all(s in synset_index for s in synsets):
        names = {lang: [imagenet.class_names(lang)[synset_index[s]] for s in synsets] for lang in ("en", "zh")}
    else:  # not ImageNet synsets: the folder's own English name only
        names = {"en": [f.split("-", 1)[-1].replace("_", " ") for f in folders]}
    return FineGrainedSet(_present(samples), folders, names)


def _cars_devkit(root: Path, annos: Path, bad: BadInputs) -> FineGrainedSet:
    meta = next((p for p in (root / "devkit" / "cars_meta.mat", root / "cars_meta.mat") if p.is_file()), None)
    if meta is None:
        raise ValueError(f"stanford-cars: {root}/devkit/cars_meta.mat does not exist (the devkit's class names)")
    names = [str(n) for n in _mat_field(_load_mat(meta), "class_names", meta)]
    records = _mat_field(_load_mat(annos), "annotations", annos)
    samples = []
    for number, record in enumerate(records, start=1):
        label = int(record["class"]) - 1  # 1-based in the devkit
        if not 0 <= label < len(names):
            raise ValueError(f"stanford-cars: {annos}: annotation {number} has class {label + 1}, outside "
                             f"1..{len(names)} of {meta}")
        samples.append(_image(root / "cars_test" / str(record["fname"]), f"{annos}:{number}", label, bad))
    return FineGrainedSet(_present(samples), None, {"en": names})


def read_cars(root: Path, bad: BadInputs) -> FineGrainedSet:
    """Stanford Cars: the devkit layout (cars_test/, cars_test_annos_withlabels.mat, devkit/cars_meta.mat) or
    the folder layout test/<class name>/…jpg (sorted folder names = labels, and the English names)."""
    for annos in (root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos_withlabels.mat"):
        if annos.is_file():
            return _cars_devkit(root, annos, bad)
    test = root / "test"
    if not test.is_dir():
        raise ValueError(f"stanford-cars: {root} has neither cars_test_annos_withlabels.mat (devkit layout) nor "
                         "test/<class name>/ (folder layout)")
    folders = sorted(p.name for p in test.iterdir() if p.is_dir())
    samples = [Sample(image=str(p), where=str(p), label=label) for label, folder in enumerate(folders)
               for p in sorted((test / folder).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return FineGrainedSet(samples, folders, {"en": list(folders)})


def read_fine_grained(dataset: str, data_dir: str | Path, bad: BadInputs) -> FineGrainedSet:
    """The test split of `dataset` (one of DATASETS) under `data_dir`, with its class names."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"{dataset}: {root} is not a directory")
    readers = {"cub-200": read_cub, "stanford-dogs": read_dogs, "stanford-cars": read_cars}
    if dataset not in readers:
        raise ValueError(f"zero-shot: unknown fine-grained dataset {dataset!r} (one of {', '.join(DATASETS)})")
    found = readers[dataset](root, bad)
    if not found.samples:
        raise ValueError(f"{dataset}: {root} holds no usable test images")
    return found


def templates_key(dataset: str, lang: str) -> str:
    """clip-benchmark's template set for `dataset` in `lang`: `cars` for Cars in English, else `imagenet1k`."""
    return "cars" if (dataset, lang) == ("stanford-cars", "en") else "imagenet1k"
