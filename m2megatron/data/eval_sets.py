"""Eval sets with ground truth: image–text retrieval sets and classification folders.

Images are produced on demand (`set.images(indices)` → float32 [n, 3, S, S], reference eval
preprocessing), so a distributed feature extractor can give each DP rank its own slice of indices.

Retrieval ground truth: `caption_image[t]` is the image caption t belongs to. In the held-out synthetic
set every image is a distinct scene, so each caption has exactly one right image (its own), and with
language="both" each image has one English and one Chinese caption. For the reference jsonl sets,
duplicate caption strings exist (SPEC.md §6.2): the reference protocol counts a caption as positive
for every image that has the same string; compare `captions` strings to apply it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from m2megatron.data.formats import ShardError, read_file, read_jsonl, scan_image_folder
from m2megatron.data.image import ImageLimits, decode_pil, eval_preprocess, normalize_uint8
from m2megatron.data.skips import BadSample
from m2megatron.data.synthetic import NUM_SCENES, SyntheticScenes
from m2megatron.data.tokenizer import preprocess_eval_text

ImageLoader = Callable[[Sequence[int]], torch.Tensor]


@dataclass
class RetrievalSet:
    name: str
    image_keys: list[str]
    captions: list[str]
    caption_image: list[int]  # image index of each caption
    caption_lang: list[str]  # "en"/"zh" for synthetic sets, "" when unknown
    load: ImageLoader = field(repr=False)

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """Preprocessed images [len(indices), 3, S, S] in [−1, 1]."""
        return self.load(list(indices))

    def image_captions(self) -> list[list[int]]:
        """For each image, the indices of its captions."""
        out: list[list[int]] = [[] for _ in range(self.num_images)]
        for t, i in enumerate(self.caption_image):
            out[i].append(t)
        return out

    def subset(self, lang: str) -> RetrievalSet:
        """The same images with only the captions of language `lang`."""
        keep = [t for t, lg in enumerate(self.caption_lang) if lg == lang]
        return replace(self, name=f"{self.name}-{lang}", captions=[self.captions[t] for t in keep],
                       caption_image=[self.caption_image[t] for t in keep], caption_lang=[lang] * len(keep))


def build_synthetic_eval_set(*, seed: int, num_samples: int = 256, image_size: int,
                             language: str = "both") -> RetrievalSet:
    """Held-out synthetic retrieval set: `num_samples` distinct scenes (the eval split of `seed`)."""
    if not 0 < num_samples <= NUM_SCENES:
        raise ValueError(f"synthetic eval set: num_samples must be in [1, {NUM_SCENES}] (distinct scenes), "
                         f"got {num_samples}")
    scenes = SyntheticScenes(seed=seed, image_size=image_size, language=language, split="eval")
    langs = ["en", "zh"] if language == "both" else [language]
    captions, caption_image, caption_lang = [], [], []
    for i in range(num_samples):
        caps = scenes.captions(i)
        for lang in langs:
            captions.append(caps[lang])
            caption_image.append(i)
            caption_lang.append(lang)

    def load(indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([normalize_uint8(scenes[i].image) for i in indices]))

    keys = [f"eval-{seed}-{i:08d}" for i in range(num_samples)]
    return RetrievalSet("synthetic", keys, captions, caption_image, caption_lang, load)


def _file_loader(paths: list[Path], image_size: int, limits: ImageLimits) -> ImageLoader:
    def load(indices: Sequence[int]) -> torch.Tensor:
        out = []
        for i in indices:
            try:
                out.append(eval_preprocess(decode_pil(read_file(paths[i]), limits), image_size))
            except BadSample as bad:
                raise ShardError(f"eval image {paths[i]}: {bad}") from None
        return torch.from_numpy(np.stack(out)) if out else torch.empty(0, 3, image_size, image_size)

    return load


def load_retrieval_jsonl(jsonl: str | Path, *, image_root: str | Path | None = None, image_size: int,
                         preprocess_text: bool = True, limits: ImageLimits | None = None) -> RetrievalSet:
    """A reference-format retrieval set; captions get the reference eval preprocessing by default.

    Image paths are relative to `image_root` (default: the jsonl's folder). A missing or undecodable
    image is an error naming it when it is loaded (an eval set must be complete).
    """
    items = read_jsonl(jsonl)
    root = Path(image_root) if image_root is not None else Path(jsonl).parent
    captions, caption_image = [], []
    for i, item in enumerate(items):
        for c in item.captions:
            captions.append(preprocess_eval_text(c) if preprocess_text else c)
            caption_image.append(i)
    paths = [root / item.image for item in items]
    return RetrievalSet(Path(jsonl).stem, [item.image for item in items], captions, caption_image,
                        [""] * len(captions), _file_loader(paths, image_size, limits or ImageLimits(min_side=1)))


@dataclass
class ClassificationSet:
    classes: list[str]  # folder names, sorted
    paths: list[str]
    labels: list[int]
    load: ImageLoader = field(repr=False)

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        return self.load(list(indices))


def load_image_folder(root: str | Path, *, image_size: int, limits: ImageLimits | None = None) -> ClassificationSet:
    """Classification set from `root/<class name>/<image>` (labels follow the sorted folder names)."""
    classes, items = scan_image_folder(root)
    paths = [Path(p) for p, _ in items]
    return ClassificationSet(classes, [p for p, _ in items], [lab for _, lab in items],
                             _file_loader(paths, image_size, limits or ImageLimits(min_side=1)))
