"""CLIP_benchmark's webdataset eval format (its `build_wds_dataset` / `clip_benchmark_export_wds`):

    DIR/
      test/nshards.txt                         the number of shards N (mandatory)
      test/0.tar … test/{N-1}.tar              records s0000000.webp|png|jpg|jpeg + .cls or .txt
      classnames.txt                           one class name per line, label order (classification)
      zeroshot_classification_templates.txt    one template per line with {c} (classification)
      dataset_type.txt                         'retrieval', else classification ('multilabel' unsupported)

A classification record's label is its `.cls` member (an integer); a retrieval record's captions are
the lines of its `.txt` member (`str.splitlines`, exactly as CLIP_benchmark reads them: a caption's
own newlines are stored as a literal `\\n` and stay so). The image is the first of webp, png, jpg,
jpeg present, CLIP_benchmark's order. Local folders only: download a hub copy first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from m2megatron.data.formats import TarRecord, iter_tar_records
from m2megatron.data.skips import BadSample
from m2megatron.eval.inputs import BadInputs, Sample, class_index

IMAGE_ORDER = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's to_tuple order


@dataclass
class BenchmarkSet:
    task: str
    """'zeroshot' (classification) or 'retrieval', from dataset_type.txt."""
    samples: list[Sample]
    class_names: list[str] | None = None
    templates: list[str] | None = None
    """The templates file beside the shards ({c} slots), None when absent."""


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def dataset_task(root: str | Path) -> str:
    """'retrieval' or 'zeroshot' from DIR/dataset_type.txt (absent: classification, as CLIP_benchmark)."""
    type_file = Path(root) / "dataset_type.txt"
    kind = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    if kind == "retrieval":
        return "retrieval"
    if kind == "classification":
        return "zeroshot"
    raise ValueError(f"CLIP_benchmark wds: {type_file} says {kind!r}; only classification and retrieval are supported")


def shard_paths(root: str | Path, split: str) -> list[str]:
    """DIR/split/{0..N-1}.tar from DIR/split/nshards.txt."""
    nshards = Path(root) / split / "nshards.txt"
    if not nshards.is_file():
        raise ValueError(f"CLIP_benchmark wds: {nshards} does not exist (is {root} a CLIP_benchmark webdataset "
                         f"folder with a '{split}' split?)")
    try:
        count = int(nshards.read_text().strip())
    except ValueError:
        raise ValueError(f"CLIP_benchmark wds: {nshards} does not hold an integer") from None
    paths = [str(Path(root) / split / f"{i}.tar") for i in range(count)]
    missing = [p for p in paths if not Path(p).is_file()]
    if count < 1 or missing:
        raise ValueError(f"CLIP_benchmark wds: {nshards} says {count} shards; missing {missing[:3]}")
    return paths


def _image(record: TarRecord) -> bytes:
    image = next((record.members[e] for e in IMAGE_ORDER if e in record.members), None)
    if image is None:
        raise BadSample("missing_image", record.key)
    return image


def _captions(record: TarRecord) -> tuple[str, ...]:
    if "txt" not in record.members:
        raise BadSample("missing_caption", record.key)
    try:
        captions = tuple(record.members["txt"].decode("utf-8").splitlines())
    except UnicodeDecodeError:
        raise BadSample("bad_utf8", record.key) from None
    if not captions or not all(c.strip() for c in captions):
        raise BadSample("empty_caption", record.key)
    return captions


def _read_records(paths: list[str], task: str, bad: BadInputs) -> list[Sample]:
    samples = []
    for shard in paths:
        for record in iter_tar_records(shard):
            if isinstance(record, BadSample):
                bad.handle(record.reason, f"{shard}: {record}")
                continue
            where = f"{shard}:{record.key}"
            try:
                image = _image(record)
                if task == "retrieval":
                    samples.append(Sample(image=image, where=where, captions=_captions(record)))
                else:
                    samples.append(Sample(image=image, where=where, label=class_index(record)))
            except BadSample as exc:
                bad.handle(exc.reason, f"{where}: {exc}")
            except ValueError as exc:
                bad.handle("bad_label", f"{where}: {exc}")
    return samples


def read_benchmark_wds(root: str | Path, split: str, bad: BadInputs) -> BenchmarkSet:
    """Samples, and for classification the class names and templates, of a CLIP_benchmark wds folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"CLIP_benchmark wds: {root} is not a directory")
    task = dataset_task(root)
    samples = _read_records(shard_paths(root, split), task, bad)
    if not samples:
        raise ValueError(f"CLIP_benchmark wds: {root}/{split} holds no usable samples")
    if task == "retrieval":
        return BenchmarkSet(task, samples)
    names_file, templates_file = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
    names = _read_lines(names_file) if names_file.is_file() else None
    templates = [t for t in _read_lines(templates_file) if t] if templates_file.is_file() else None
    return BenchmarkSet(task, samples, names, templates)
