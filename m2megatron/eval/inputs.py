"""Eval inputs: the reference caption jsonl with an image root, webdataset shards, image folders.

Bad input never turns into a silently wrong metric. Each reader takes a `BadInputs` policy:
`error` (the default) raises a ValueError naming the file and line/member, `skip` drops the broken
sample, logs it and counts it; the counts go into the results file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from m2megatron.data.formats import (
    IMAGE_EXTS,
    ShardError,
    TarRecord,
    expand_shards,
    iter_tar_records,
    record_sample,
    scan_image_folder,
)
from m2megatron.data.skips import BadSample, SkipCounter


@dataclass
class BadInputs:
    """What to do with a broken sample (error or skip), and the per-reason counts of skipped ones."""

    policy: Literal["error", "skip"] = "error"
    counter: SkipCounter = field(default_factory=SkipCounter)

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ValueError(f"eval.on_bad_input: {self.policy!r} is not 'error' or 'skip'")

    def handle(self, reason: str, message: str) -> None:
        """Raise ValueError(message) under 'error'; count and log (the first few of each reason) under 'skip'."""
        if self.policy == "error":
            raise ValueError(message + " (set eval.on_bad_input=skip to skip such samples and count them)")
        self.counter.add(reason, message)

    def counts(self) -> dict[str, int]:
        return self.counter.counts()


@dataclass(frozen=True)
class Sample:
    """One image (a path or encoded bytes) with its captions (retrieval) or class label (zero-shot)."""

    image: str | bytes
    where: str
    """Where the sample came from, for error messages: 'file.jsonl:17' or 'shard.tar:key'."""
    captions: tuple[str, ...] = ()
    label: int = -1


def _parse_caption_line(raw: bytes, where: str) -> tuple[str, list[str]]:
    """(image, captions) of one jsonl line, or ValueError naming `where`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not valid UTF-8") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: malformed JSON ({exc.msg})") from None
    if not isinstance(record, dict) or "image" not in record or "caption" not in record:
        raise ValueError(f"{where}: expected an object with keys 'image' and 'caption'")
    image, captions = record["image"], record["caption"]
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: 'image' must be a non-empty path string")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'caption' must be a list of strings")
    if not captions:
        raise ValueError(f"{where}: empty caption list for image {image}")
    return image, captions


def _missing_folder(where: str, root: Path, folder: Path) -> str:
    message = f"eval: {where}: image folder {folder} does not exist under the image root {root}"
    if folder.name in ("train2014", "val2014"):  # COCO-CN, the reference coco-cn_test.jsonl: both splits
        message += ("; COCO-CN takes images from both COCO 2014 splits: put train2014/ and val2014/ side by side "
                    "under one image root (docs/REPRODUCE.md)")
    return message


def read_caption_jsonl(path: str | Path, image_root: str | Path, bad: BadInputs) -> list[Sample]:
    """The reference format: one {"image": relative path, "caption": [str, ...]} object per line."""
    path, root = Path(path), Path(image_root)
    if not path.is_file():
        raise ValueError(f"eval: caption file {path} does not exist")
    if not root.is_dir():
        raise ValueError(f"eval: image root {root} is not a directory")
    samples: list[Sample] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                image, captions = _parse_caption_line(line, where)
            except ValueError as exc:
                bad.handle("bad_caption_line", str(exc))
                continue
            image_path = root / image
            if not image_path.parent.is_dir():  # a layout error, not a bad sample: never skipped
                raise ValueError(_missing_folder(where, root, image_path.parent))
            if not image_path.is_file():
                bad.handle("missing_image", f"{where}: image file {image_path} does not exist")
                continue
            samples.append(Sample(image=str(image_path), where=where, captions=tuple(captions)))
    if not samples:
        raise ValueError(f"eval: {path} holds no usable samples")
    return samples


def _shard_samples(patterns: list[str] | str, bad: BadInputs, convert) -> list[Sample]:
    """Records of webdataset shards → samples via convert(record, where); BadSample → bad.handle."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    samples: list[Sample] = []
    for shard in expand_shards(patterns):
        for record in iter_tar_records(shard):
            if isinstance(record, BadSample):
                bad.handle(record.reason, f"{shard}: {record}")
                continue
            where = f"{shard}:{record.key}"
            try:
                samples.append(convert(record, where))
            except BadSample as exc:
                bad.handle(exc.reason, f"{where}: {exc}")
            except ValueError as exc:
                bad.handle("bad_label", f"{where}: {exc}")
    if not samples:
        raise ValueError(f"eval: shards {patterns} hold no usable samples")
    return samples


def _caption_sample(record: TarRecord, where: str) -> Sample:
    image, captions = record_sample(record)
    return Sample(image=image, where=where, captions=tuple(captions))


def class_index(record: TarRecord) -> int:
    """The sample's class from its `.cls` member (webdataset's convention, also CLIP_benchmark's)."""
    try:
        label = int(record.members["cls"].decode("utf-8").strip())
    except (KeyError, UnicodeDecodeError, ValueError):
        raise ValueError("needs a .cls member holding a non-negative integer") from None
    if label < 0:
        raise ValueError(f"negative class index {label} in .cls")
    return label


def _label_sample(record: TarRecord, where: str) -> Sample:
    image = next((record.members[e] for e in IMAGE_EXTS if e in record.members), None)
    if image is None:
        raise BadSample("missing_image", where)
    return Sample(image=image, where=where, label=class_index(record))


def read_caption_shards(patterns: list[str] | str, bad: BadInputs) -> list[Sample]:
    """Webdataset tars of the training format: <key>.jpg|png|… with <key>.txt or <key>.json {"caption": …}."""
    return _shard_samples(patterns, bad, _caption_sample)


def read_label_shards(patterns: list[str] | str, bad: BadInputs) -> list[Sample]:
    """Webdataset tars with <key>.jpg|png|… and <key>.cls (the integer class index)."""
    return _shard_samples(patterns, bad, _label_sample)


def read_image_folder(root: str | Path) -> tuple[list[str], list[Sample]]:
    """ImageNet-style folder: one sub-folder per class (sorted names = label order), images inside."""
    try:
        folders, items = scan_image_folder(root)
    except ShardError as exc:
        raise ValueError(f"zero-shot: {exc}") from None
    if not items:
        raise ValueError(f"zero-shot: image folder {root} holds no images")
    return folders, [Sample(image=path, where=path, label=label) for path, label in items]


def synthetic_held_out(*, seed: int, image_size: int, language: str,
                       num_samples: int) -> tuple[list, list[list[str]]]:
    """(uint8 [S, S, 3] images, one-caption lists) of the held-out synthetic set: the first `num_samples`
    scenes of the eval split, all distinct (so every caption has one right image) and never drawn by
    training; with language 'both' each image's caption is English or Chinese as the split draws it."""
    from m2megatron.data.synthetic import NUM_SCENES, SyntheticScenes

    if not 0 < num_samples <= NUM_SCENES:
        raise ValueError(f"data.synthetic_eval_samples: must be in [1, {NUM_SCENES}] (distinct scenes), "
                         f"got {num_samples}")
    scenes = SyntheticScenes(seed=seed, image_size=image_size, language=language, split="eval")
    samples = [scenes[i] for i in range(num_samples)]
    return [s.image for s in samples], [[s.caption] for s in samples]
