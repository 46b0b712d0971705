"""Image decoding with DALI or PIL (`DataConfig.decoder`: auto, dali, pil), in two interfaces.

- Batch decoders (eval, benchmarks): `decoder.decode(encoded, boxes, flips)` returns the decoded,
  normalized images of the samples that decoded and a {position: BadSample} map of the ones that did not.
- Chunk decoders (the training loader; `build_chunk_decoder`): `submit(encoded, boxes, flips)` up to
  `depth` chunks ahead, then `result()` per chunk in submission order → per image a [3, S, S] tensor or
  a BadSample; `reset()` drops the chunks in flight, `close()` releases threads/processes. Three kinds:
  DALI pipelined (`dali_decode.DaliChunks`), PIL worker processes (`worker_pool.PilWorkerPool`), and
  PIL in the loader's own thread (`InlineChunks`).

auto = DALI `mixed` on a GPU host, PIL on a CPU host (DALI's CPU pipeline costs ~1.7× more per core than
PIL here, docs/DATA.md). Callers probe each image's header first (`image.probe_image`), so DALI rarely
meets a bad image; when a DALI batch fails anyway, it is decoded again image by image with PIL to find
and skip the culprit.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from m2megatron.config.base import ConfigError
from m2megatron.data.image import ImageLimits, decode_pil, preprocess_pil
from m2megatron.data.skips import BadSample

Box = tuple[float, float, float, float]
log = logging.getLogger("m2megatron.data")


class PilDecoder:
    """PIL decode + bicubic resize + normalize, on `num_threads` threads (probed=True: the caller has checked
    the image headers already; raw=True: uint8 images, not normalized)."""

    name = "pil"
    device = torch.device("cpu")

    def __init__(self, size: int, limits: ImageLimits, num_threads: int = 1, probed: bool = False,
                 raw: bool = False):
        self.size, self.limits, self.probed, self.raw = size, limits, probed, raw
        self._pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def _one(self, args) -> np.ndarray | BadSample:
        data, box, flip = args
        try:
            return preprocess_pil(decode_pil(data, self.limits, probe=not self.probed), self.size, box, flip,
                                  normalize=not self.raw)
        except BadSample as bad:
            return bad

    def decode(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]):
        jobs = list(zip(encoded, boxes, flips))
        results = list(self._pool.map(self._one, jobs)) if self._pool else [self._one(j) for j in jobs]
        bad = {i: r for i, r in enumerate(results) if isinstance(r, BadSample)}
        good = [r for r in results if not isinstance(r, BadSample)]
        images = torch.from_numpy(np.stack(good)) if good else \
            torch.empty(0, 3, self.size, self.size, dtype=torch.uint8 if self.raw else torch.float32)
        return images, bad

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=False)


class DaliDecoder:
    """DALI decode (`mixed` on GPU, `cpu` otherwise) with a per-batch PIL fallback on failure."""

    name = "dali"

    def __init__(self, size: int, limits: ImageLimits, max_batch: int, num_threads: int = 1, gpu: bool = False,
                 raw: bool = False):
        from m2megatron.data.dali_decode import DaliPipeline

        self.pipe = DaliPipeline(size, max_batch, num_threads, gpu, raw=raw)
        self.device = self.pipe.device
        self.fallback = PilDecoder(size, limits, 1, raw=raw)
        self.fallbacks = 0  # batches that DALI failed on

    def decode(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]):
        if not encoded:
            return torch.empty(0, 3, self.pipe.size, self.pipe.size, device=self.device,
                               dtype=torch.uint8 if self.pipe.raw else torch.float32), {}
        try:
            return self.pipe.run(encoded, boxes, flips), {}
        except RuntimeError:
            self.pipe.reset()
            self.fallbacks += 1
            images, bad = self.fallback.decode(encoded, boxes, flips)
            return images.to(self.device), bad

    def close(self) -> None:
        self.fallback.close()


class InlineChunks:
    """Chunks decoded in the calling thread by a batch decoder (PIL or synchronous DALI): one in flight."""

    depth = 1

    def __init__(self, decoder, chunk: int):
        self.decoder, self.chunk, self.name, self.device = decoder, chunk, decoder.name, decoder.device
        self._pending = None
        self.images_decoded = 0

    def submit(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]) -> None:
        if self._pending is not None:
            raise RuntimeError("inline decoder: one chunk at a time")
        self._pending = (encoded, boxes, flips)

    def result(self) -> list[torch.Tensor | BadSample]:
        """Per image of the chunk: its [3, S, S] tensor, or the BadSample it raised."""
        encoded, boxes, flips = self._pending
        self._pending = None
        images, bad = self.decoder.decode(encoded, boxes, flips)
        self.images_decoded += len(encoded)
        good = iter(images)
        return [bad[j] if j in bad else next(good) for j in range(len(encoded))]

    def reset(self) -> None:
        self._pending = None

    def close(self) -> None:
        self.reset()
        self.decoder.close()


def _check_kind(kind: str) -> None:
    from m2megatron.data.dali_decode import dali_available

    if kind not in ("auto", "dali", "pil"):
        raise ConfigError(f"data.decoder: {kind!r} is not one of ['auto', 'dali', 'pil']")
    if kind == "dali" and not dali_available():
        raise ConfigError("data.decoder: 'dali' needs nvidia-dali (pip install nvidia-dali-cuda130==2.4.0)")


def resolve_decoder_kind(kind: str, gpu: bool | None = None) -> tuple[str, bool]:
    """(decoder, gpu) for a DataConfig.decoder value. auto: DALI `mixed` on a GPU host (when DALI is
    installed), else PIL, which is ~1.7× cheaper per core than DALI's CPU pipeline (docs/DATA.md).
    dali: `mixed` on a GPU host, DALI's CPU pipeline elsewhere. gpu=None: CUDA if present."""
    from m2megatron.data.dali_decode import dali_available

    _check_kind(kind)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if kind == "auto":
        kind = "dali" if gpu and dali_available() else "pil"
    return kind, gpu and kind == "dali"


def build_decoder(kind: str, size: int, limits: ImageLimits, max_batch: int, num_threads: int = 1,
                  gpu: bool | None = None, probed: bool = False, raw: bool = False):
    """A batch decoder (`decode(encoded, boxes, flips)`) for `kind` auto/dali/pil (see resolve_decoder_kind).
    probed=True: the caller has checked the headers (PIL does not check them again); raw=True: uint8 images."""
    kind, gpu = resolve_decoder_kind(kind, gpu)
    if kind == "pil":
        return PilDecoder(size, limits, num_threads, probed, raw)
    return DaliDecoder(size, limits, max_batch, num_threads, gpu, raw)


WORKER_CHUNK = 32
"""Images per chunk sent to a PIL worker process (independent of the batch size: results are per image)."""


def build_chunk_decoder(kind: str, size: int, limits: ImageLimits, batch: int, *, num_workers: int,
                        depth: int = 2, gpu: bool | None = None, log_choice: bool = True):
    """The loader's decoder: DALI pipelined (`depth` chunks of `batch` images in flight), PIL worker
    processes (`num_workers` ≥ 1, `depth` chunks each) or PIL in the loader's thread (num_workers = 0).
    Its images are uint8 [3, S, S], normalized on the device (image.normalize_images)."""
    requested = kind
    kind, gpu = resolve_decoder_kind(kind, gpu)
    if kind == "dali":
        from m2megatron.data.dali_decode import DaliChunks, DaliPipeline

        pipe = DaliPipeline(size, batch, max(1, num_workers), gpu, depth=max(2, depth), raw=True)
        decoder = DaliChunks(pipe, PilDecoder(size, limits, 1, raw=True))
        what = f"DALI {'mixed (GPU)' if gpu else 'CPU'}, {pipe.num_threads} threads, prefetch depth {pipe.depth}"
    elif num_workers > 0:
        from m2megatron.data.worker_pool import PilWorkerPool

        decoder = PilWorkerPool(size, limits, num_workers, min(batch, WORKER_CHUNK), per_worker=max(1, depth))
        what = f"PIL, {num_workers} worker processes"
    else:
        decoder = InlineChunks(PilDecoder(size, limits, 1, probed=True, raw=True), batch)
        what = "PIL in the loader thread"
    if log_choice:
        log.info("data.decoder=%s: decoding with %s", requested, what)
    return decoder
