"""The Karpathy split of Flickr30K and COCO with every caption (5 per image; a few COCO images have 6), the
protocol of the paper's English retrieval table, in the two files it is commonly shipped as:

- Karpathy's `dataset_flickr30k.json` / `dataset_coco.json`: {"images": [{"filename", "filepath" (COCO:
  val2014 / train2014), "split": train|val|test|restval, "sentences": [{"raw": caption}, ...]}, ...]};
  image = <image root>/<filepath>/<filename>;
- CLIP_benchmark's `flickr30k_<split>_karpathy.txt` (its `flickr30k` dataset): a header line, then
  `<image>.jpg,<caption>` lines, five per image; image = <image root>/<image>.jpg.

CLIP_benchmark's webdataset export of the same set is read by `--wds` (m2megatron/eval/benchmark_wds.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from m2megatron.eval.inputs import BadInputs, Sample

SPLITS = ("train", "val", "test", "restval")


def _karpathy_json(path: Path, split: str) -> list[tuple[str, list[str], str]]:
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"eval: {path}: not a Karpathy split json with an 'images' list ({exc})") from None
    out = []
    for number, entry in enumerate(images):
        where = f"{path}:images[{number}]"
        try:
            if entry["split"] != split:
                continue
            relative = str(Path(entry.get("filepath", "")) / entry["filename"])
            captions = [s["raw"] for s in entry["sentences"]]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: expected 'filename', 'split' and 'sentences' [{{'raw': caption}}]") from None
        out.append((relative, captions, where))
    return out


def _clip_benchmark_txt(path: Path) -> list[tuple[str, list[str], str]]:
    by_image: dict[str, tuple[list[str], str]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[1:], start=2):  # the first line is the header
        if not line.strip():
            continue
        image, sep, caption = line.strip().partition(".jpg,")
        if not sep:
            raise ValueError(f"eval: {path}:{number}: expected '<image>.jpg,<caption>' (CLIP_benchmark's format)")
        by_image.setdefault(image + ".jpg", ([], f"{path}:{number}"))[0].append(caption)
    return [(image, captions, where) for image, (captions, where) in by_image.items()]


def read_karpathy(path: str | Path, image_root: str | Path, split: str, bad: BadInputs) -> list[Sample]:
    """The `split` images of a Karpathy json (or CLIP_benchmark's split txt) with all their captions."""
    path, root = Path(path), Path(image_root)
    if not path.is_file():
        raise ValueError(f"eval: Karpathy split file {path} does not exist")
    if not root.is_dir():
        raise ValueError(f"eval: image root {root} is not a directory")
    if split not in SPLITS:
        raise ValueError(f"eval: --split {split!r} is not one of the Karpathy splits {', '.join(SPLITS)}")
    entries = _clip_benchmark_txt(path) if path.suffix == ".txt" else _karpathy_json(path, split)
    samples = []
    for relative, captions, where in entries:
        image = root / relative
        if not captions:
            bad.handle("empty_captions", f"{where}: no captions for {relative}")
        elif not image.is_file():
            bad.handle("missing_image", f"{where}: image file {image} does not exist")
        else:
            samples.append(Sample(image=str(image), where=where, captions=tuple(captions)))
    if not samples:
        raise ValueError(f"eval: {path} holds no usable {split} images")
    return samples
