"""Batch image decoding with DALI or PIL behind one interface (`DataConfig.decoder`: auto, dali, pil).

`decoder.decode(encoded, boxes, flips)` returns the decoded, normalized images of the samples that
decoded and a {position: BadSample} map of the ones that did not. Callers probe each image's header
first (`image.probe_image`), so DALI rarely meets a bad image; when a DALI batch fails anyway, that
batch is decoded again image by image with PIL to find and skip the culprit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from m2megatron.config.base import ConfigError
from m2megatron.data.image import ImageLimits, decode_pil, preprocess_pil
from m2megatron.data.skips import BadSample

Box = tuple[float, float, float, float]


class PilDecoder:
    """PIL decode + bicubic resize + normalize, on `num_threads` threads."""

    name = "pil"
    device = torch.device("cpu")

    def __init__(self, size: int, limits: ImageLimits, num_threads: int = 1):
        self.size, self.limits = size, limits
        self._pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def _one(self, args) -> np.ndarray | BadSample:
        data, box, flip = args
        try:
            return preprocess_pil(decode_pil(data, self.limits), self.size, box, flip)
        except BadSample as bad:
            return bad

    def decode(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]):
        jobs = list(zip(encoded, boxes, flips))
        results = list(self._pool.map(self._one, jobs)) if self._pool else [self._one(j) for j in jobs]
        bad = {i: r for i, r in enumerate(results) if isinstance(r, BadSample)}
        good = [r for r in results if not isinstance(r, BadSample)]
        images = torch.from_numpy(np.stack(good)) if good else torch.empty(0, 3, self.size, self.size)
        return images, bad

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=False)


class DaliDecoder:
    """DALI decode (`mixed` on GPU, `cpu` otherwise) with a per-batch PIL fallback on failure."""

    name = "dali"

    def __init__(self, size: int, limits: ImageLimits, max_batch: int, num_threads: int = 1, gpu: bool = False):
        from m2megatron.data.dali_decode import DaliPipeline

        self.pipe = DaliPipeline(size, max_batch, num_threads, gpu)
        self.device = self.pipe.device
        self.fallback = PilDecoder(size, limits, 1)
        self.fallbacks = 0  # batches that DALI failed on

    def decode(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]):
        if not encoded:
            return torch.empty(0, 3, self.pipe.size, self.pipe.size, device=self.device), {}
        try:
            return self.pipe.run(encoded, boxes, flips), {}
        except RuntimeError:
            self.pipe.reset()
            self.fallbacks += 1
            images, bad = self.fallback.decode(encoded, boxes, flips)
            return images.to(self.device), bad

    def close(self) -> None:
        self.fallback.close()


def build_decoder(kind: str, size: int, limits: ImageLimits, max_batch: int, num_threads: int = 1,
                  gpu: bool | None = None):
    """`kind` auto/dali/pil → a decoder. auto = DALI when importable, else PIL. gpu=None: CUDA if present."""
    from m2megatron.data.dali_decode import dali_available

    if kind not in ("auto", "dali", "pil"):
        raise ConfigError(f"data.decoder: {kind!r} is not one of ['auto', 'dali', 'pil']")
    if kind == "pil" or (kind == "auto" and not dali_available()):
        return PilDecoder(size, limits, num_threads)
    if not dali_available():
        raise ConfigError("data.decoder: 'dali' needs nvidia-dali (pip install nvidia-dali-cuda130==2.4.0)")
    gpu = torch.cuda.is_available() if gpu is None else gpu
    return DaliDecoder(size, limits, max_batch, num_threads, gpu)
