"""Model inputs for feature extraction: `make_batch(indices, first_stage) -> Batch` callables.

They return host tensors (or DALI's device tensors); the stage runtime moves them to the runtime device.

Images may be given as file paths, encoded bytes, uint8 HWC arrays, PIL images, or one float tensor
[N, 3, H, W] that is already preprocessed ((x − 0.5)/0.5 at the model's image size). Paths and bytes
are decoded with the data package's decoder (PIL by default: the reference's bicubic squash, no crop);
arrays and PIL images get the same squash. Texts are tokenized on the fly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from m2megatron.data.decode import build_decoder
from m2megatron.data.formats import read_file
from m2megatron.data.image import FULL_BOX, ImageLimits, eval_preprocess
from m2megatron.data.skips import BadSample
from m2megatron.data.tokenizer import preprocess_eval_text
from m2megatron.eval.features import Batch, ReplicaEncoder, extract_features


def prepare_texts(texts: Sequence[str], reference_preprocessing: bool) -> list[str]:
    """The reference eval's lower-casing and quote straightening, when `reference_preprocessing`."""
    return [preprocess_eval_text(t) for t in texts] if reference_preprocessing else list(texts)


class TextBatches:
    """Token ids and masks of `texts`; stages after the first only need the mask."""

    def __init__(self, texts: Sequence[str], tokenizer):
        self.texts, self.tokenizer = list(texts), tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __call__(self, indices: Sequence[int], first_stage: bool) -> Batch:
        ids, mask = self.tokenizer.encode([self.texts[i] for i in indices])
        return {"text_ids": ids if first_stage else None, "text_mask": mask}


class ImageBatches:
    """Preprocessed pixels [b, 3, S, S] of `images` (see the module docstring for the accepted kinds)."""

    def __init__(self, images, image_size: int, *, where: Sequence[str] | None = None, decoder: str = "pil",
                 num_workers: int = 1, max_batch: int = 256):
        self.images, self.size = images, image_size
        self.max_batch = max_batch
        self.where = where
        self._decoder_kind, self._num_workers = decoder, num_workers
        self._decoder = None
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1:] != (3, image_size, image_size):
                raise ValueError(f"eval: an image tensor must be [N, 3, {image_size}, {image_size}] (preprocessed), "
                                 f"got {tuple(images.shape)}")
            if not images.is_floating_point():
                raise ValueError("eval: an image tensor must be float, normalized as (x − 0.5)/0.5")

    def __len__(self) -> int:
        return len(self.images)

    def _name(self, i: int) -> str:
        return self.where[i] if self.where is not None else f"image {i}"

    def _decode(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode encoded images (paths or bytes) with the data package's decoder; a failure names the file."""
        if self._decoder is None:
            self._decoder = build_decoder(self._decoder_kind, self.size, ImageLimits(),
                                          max_batch=max(self.max_batch, len(indices)), num_threads=self._num_workers)
        encoded = []
        for i in indices:
            item = self.images[i]
            try:
                encoded.append(item if isinstance(item, bytes) else read_file(item))
            except BadSample as exc:
                raise ValueError(f"{self._name(i)}: cannot read image ({exc})") from None
        pixels, bad = self._decoder.decode(encoded, [FULL_BOX] * len(encoded), [False] * len(encoded))
        if bad:
            pos, exc = next(iter(bad.items()))
            raise ValueError(f"{self._name(indices[pos])}: cannot decode image ({exc})")
        return pixels

    def _convert(self, item) -> np.ndarray:
        from PIL import Image

        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise ValueError(f"eval: image arrays must be uint8 [H, W, 3], got {item.dtype} {item.shape}")
            item = Image.fromarray(item)
        return eval_preprocess(item, self.size)

    def __call__(self, indices: Sequence[int], first_stage: bool) -> Batch:
        if not first_stage:
            return {}
        if isinstance(self.images, torch.Tensor):
            pixels = self.images[list(indices)]
        elif all(isinstance(self.images[i], (str, bytes)) for i in indices):
            pixels = self._decode(indices)
        else:
            pixels = torch.from_numpy(np.stack([self._convert(self.images[i]) for i in indices]))
        return {"images": pixels.float()}

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()


def image_features(encoder: ReplicaEncoder, images, *, batch_size: int, groups, decoder: str = "pil",
                   num_workers: int = 1, where: Sequence[str] | None = None) -> tuple[torch.Tensor, float]:
    """([N, E] features of `images` on every rank, images/s): decode/squash, then `extract_features`."""
    cfg = encoder.model.cfg
    pixels = ImageBatches(images, cfg.image_size, where=where, decoder=decoder, num_workers=num_workers,
                          max_batch=batch_size)
    try:
        return extract_features(encoder, "image", len(images), pixels, batch_size=batch_size,
                                embed_dim=cfg.embed_dim, groups=groups)
    finally:
        pixels.close()


def text_features(encoder: ReplicaEncoder, texts: Sequence[str], tokenizer, *, batch_size: int,
                  groups) -> tuple[torch.Tensor, float]:
    """([N, E] features of `texts` on every rank, texts/s)."""
    batches = TextBatches(texts, tokenizer)
    return extract_features(encoder, "text", len(texts), batches, batch_size=batch_size,
                            embed_dim=encoder.model.cfg.embed_dim, groups=groups)
