"""Small fake evaluation sets in the public download layouts that docs/REPRODUCE.md documents: the
fine-grained sets (CUB-200-2011, Stanford Dogs, Stanford Cars), the Karpathy split json of Flickr30K /
COCO, and a COCO-CN style jsonl whose images come from both COCO 2014 splits. Images are tiny JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

DOG_FOLDERS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog")
CUB_FOLDERS = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
CAR_NAMES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012")


def jpeg(path: Path, seed: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size, size + 2, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_cub(root: Path, per_class: int = 2) -> Path:
    """CUB_200_2011/: images/<class folder>/x.jpg, images.txt, train_test_split.txt (every other image a
    test image), classes.txt, image_class_labels.txt."""
    root = Path(root)
    images, split, labels = [], [], []
    for c, folder in enumerate(CUB_FOLDERS):
        for k in range(2 * per_class):
            image_id = len(images) + 1
            relative = f"{folder}/{folder.split('.')[1]}_{k:04d}.jpg"
            jpeg(root / "images" / relative, seed=image_id)
            images.append(f"{image_id} {relative}")
            split.append(f"{image_id} {k % 2}")
            labels.append(f"{image_id} {c + 1}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("".join(f"{c + 1} {f}\n" for c, f in enumerate(CUB_FOLDERS)))
    return root


def write_dogs(root: Path, per_class: int = 2, list_format: str = "mat") -> Path:
    """Stanford Dogs: Images/<synset>-<name>/<synset>_<n>.jpg and lists/test_list.mat (or .txt)."""
    root = Path(root)
    test = []
    for c, folder in enumerate(DOG_FOLDERS):
        synset = folder.split("-")[0]
        for k in range(2 * per_class):
            relative = f"{folder}/{synset}_{k}.jpg"
            jpeg(root / "Images" / relative, seed=100 + 10 * c + k)
            if k % 2:
                test.append(relative)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    if list_format == "mat":
        import scipy.io

        labels = np.array([DOG_FOLDERS.index(p.split("/")[0]) + 1 for p in test])
        scipy.io.savemat(root / "lists" / "test_list.mat", {"file_list": np.array(test, dtype=object),
                                                             "labels": labels})
    else:
        (root / "lists" / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def write_cars(root: Path, per_class: int = 2, layout: str = "devkit") -> Path:
    """Stanford Cars: the devkit layout (cars_test/, cars_test_annos_withlabels.mat, devkit/cars_meta.mat)
    or the folder layout (test/<class name>/x.jpg)."""
    root = Path(root)
    items = [c for c in range(len(CAR_NAMES)) for _ in range(per_class)]
    if layout == "folders":
        for n, c in enumerate(items):
            jpeg(root / "test" / CAR_NAMES[c] / f"{n + 1:05d}.jpg", seed=200 + n)
        return root
    import scipy.io

    annotations = np.zeros(len(items), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
                                              ("bbox_y2", "O"), ("class", "O"), ("fname", "O")])
    for n, c in enumerate(items):
        jpeg(root / "cars_test" / f"{n + 1:05d}.jpg", seed=200 + n)
        annotations[n] = (0, 0, 11, 11, c + 1, f"{n + 1:05d}.jpg")
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(CAR_NAMES, dtype=object)})
    return root


def write_karpathy(path: Path, image_dir: Path, *, dataset: str = "flickr30k", num_images: int = 6,
                   captions: int = 5) -> Path:
    """Karpathy's dataset_<name>.json: images[].{filename, filepath (coco), split, sentences[].raw};
    the last two images are in the train split."""
    entries = []
    for i in range(num_images):
        split = "test" if i < num_images - 2 else "train"
        folder = "val2014" if dataset == "coco" else ""
        name = f"COCO_val2014_{i:012d}.jpg" if dataset == "coco" else f"{1000 + i}.jpg"
        jpeg(Path(image_dir) / folder / name, seed=300 + i)
        entry = {"filename": name, "split": split,
                 "sentences": [{"raw": f"image {i} caption {k}"} for k in range(captions)]}
        entries.append({**entry, "filepath": folder} if folder else entry)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"images": entries, "dataset": dataset}))
    return Path(path)


def write_coco_cn(jsonl: Path, coco_root: Path, *, num_images: int = 6) -> Path:
    """A COCO-CN style jsonl (the reference format) whose images come from train2014 and val2014."""
    lines = []
    for i in range(num_images):
        split = ("train2014", "val2014")[i % 2]
        relative = f"coco_dataset/{split}/COCO_{split}_{i:012d}.jpg"
        jpeg(Path(coco_root) / relative, seed=400 + i)
        lines.append(json.dumps({"caption": [f"第{i}张图片"], "image": relative}, ensure_ascii=False))
    Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
    Path(jsonl).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(jsonl)
