"""The DALI decode pipeline: encoded bytes → decode → (crop inside) bicubic resize → flip → normalize.

`fn.external_source` feeds the encoded images of one batch together with a relative crop box and a
flip flag per sample, so the Python reader keeps control of order, skipping and the resumable
position. The decoder is `fn.decoders.image(device="mixed")` on a GPU (nvJPEG; output is a CUDA
tensor) and `device="cpu"` with `device_id=None` on CPU (a GPU device id fails without a driver).
The resize is `INTERP_CUBIC` with antialiasing over the region of interest, matching the PIL path's
`Image.resize(BICUBIC, box=...)`; normalization is (x − 127.5)/127.5 = (x/255 − 0.5)/0.5, CHW. With raw=True
(the training loader) the output stays uint8 CHW, normalized on the device by image.normalize_images, the same
function as for the PIL path (DALI's own normalization may differ from that division by an ulp).

Two ways to run it:

- `DaliPipeline.run(...)`: synchronous, one batch (eval, benchmarks, the PIL-fallback checks).
- `DaliChunks`: asynchronous and pipelined (`exec_async`, `exec_pipelined`, `prefetch_queue_depth =
  depth ≥ 2`). The loader feeds up to `depth` chunks ahead with `feed_input` and takes the results in
  order, so DALI decodes the next chunks in its own threads (CPU) or on the GPU while the loader
  tokenizes and assembles the current one. Each chunk's inputs are kept until its result is taken:
  when DALI fails on a chunk (a bad image that passed the header probe), that chunk is decoded again
  image by image with PIL to find and skip the culprit, the pipeline is rebuilt (its state is
  undefined after an error) and the chunks behind it are fed again.

Why not DALI's parallel external source or its webdataset reader: both take the sample order out of
the loader's hands (parallel external source calls an index-addressed Python callback in worker
processes; the reader has its own sharding, shuffling and checkpoints), which would lose the
loader's exact resume and per-sample skip accounting. Reading and probing are ~5 % of the decode cost
here, so the Python side does not need worker processes for DALI.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from m2megatron.data.skips import BadSample

Box = tuple[float, float, float, float]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


class DaliPipeline:
    """One DALI pipeline for batches of up to `max_batch` images of output size `size`×`size`.

    depth = 1: synchronous `run()`. depth ≥ 2: asynchronous and pipelined with that prefetch queue depth,
    driven by `feed()` / `start()` / `take()` (see DaliChunks).
    """

    def __init__(self, size: int, max_batch: int, num_threads: int = 1, gpu: bool = False, depth: int = 1,
                 raw: bool = False):
        self.size, self.max_batch, self.num_threads, self.gpu = size, max_batch, num_threads, gpu
        self.depth, self.raw = depth, raw
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        self._pipe = None
        self._scheduled = False

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        size, gpu, pipelined, raw = self.size, self.gpu, self.depth > 1, self.raw

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=self.device.index if gpu else None,
                      exec_async=pipelined, exec_pipelined=pipelined, prefetch_queue_depth=self.depth)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT)  # (y, x), relative
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC,
                               antialias=True, roi_start=roi_start, roi_end=roi_end, roi_relative=True)
            if raw:
                return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)

        p = pipe()
        p.build()
        return p

    def feed(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]) -> None:
        """Queue one batch of inputs (the next iteration that runs consumes it)."""
        if not 0 < len(encoded) <= self.max_batch:
            raise ValueError(f"DALI batch of {len(encoded)} images (max {self.max_batch})")
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        p.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        p.feed_input("roi_start", [np.array((b[1], b[0]), np.float32) for b in boxes])
        p.feed_input("roi_end", [np.array((b[3], b[2]), np.float32) for b in boxes])
        p.feed_input("mirror", [np.array(int(f), np.int32) for f in flips])

    def schedule(self) -> None:
        """Start one more iteration; the first call starts `depth` of them (inputs for all must be fed)."""
        self._pipe.schedule_run()
        self._scheduled = True

    def take(self) -> torch.Tensor:
        """Result of the oldest scheduled iteration → float32 (raw: uint8) [n, 3, size, size] on this pipeline's
        device.
        Raises RuntimeError when DALI failed on it."""
        (out,) = self._pipe.outputs()
        return self._to_torch(out.as_tensor())

    def run(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]) -> torch.Tensor:
        """Decode one batch synchronously (depth 1). Raises on any failure."""
        assert self.depth == 1, "run() is the synchronous API; use feed/schedule/take when pipelined"
        self.feed(encoded, boxes, flips)
        (out,) = self._pipe.run()
        return self._to_torch(out.as_tensor())

    def _to_torch(self, dense) -> torch.Tensor:
        if not self.gpu:
            return torch.from_numpy(np.array(dense))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(dense.shape(), dtype=torch.uint8 if self.raw else torch.float32, device=self.device)
        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(self.device))
        return result

    def reset(self) -> None:
        """Drop the pipeline (after an error its state is undefined); the next feed builds a new one."""
        self._pipe = None
        self._scheduled = False

    @property
    def started(self) -> bool:
        return self._scheduled


class DaliChunks:
    """Pipelined DALI decoding of chunks (≤ `chunk` images each), `depth` ≥ 2 in flight, results in order.

    `fallback` is a PIL decoder (`decode(encoded, boxes, flips)` → good images, {position: BadSample});
    it decodes a chunk that DALI failed on, image by image.
    """

    name = "dali"

    def __init__(self, pipeline: DaliPipeline, fallback):
        if pipeline.depth < 2:
            raise ValueError(f"DaliChunks needs a pipelined DaliPipeline (depth >= 2), got depth {pipeline.depth}")
        self.pipe, self.fallback = pipeline, fallback
        self.depth, self.chunk, self.device = pipeline.depth, pipeline.max_batch, pipeline.device
        self._inputs: deque = deque()  # chunks fed and not yet taken, oldest first
        self.fallbacks = 0  # chunks that DALI failed on
        self.images_decoded = 0

    def submit(self, encoded: list[bytes], boxes: list[Box], flips: list[bool]) -> None:
        if len(self._inputs) >= self.depth:
            raise RuntimeError(f"DALI: more than {self.depth} chunks in flight")
        self._inputs.append((list(encoded), list(boxes), list(flips)))
        self.pipe.feed(encoded, boxes, flips)
        if self.pipe.started or len(self._inputs) == self.depth:
            self.pipe.schedule()

    def result(self) -> list[torch.Tensor | BadSample]:
        if not self._inputs:
            raise RuntimeError("DALI: result() without a chunk in flight")
        if not self.pipe.started:
            raise RuntimeError(f"DALI: result() before {self.depth} chunks were submitted (the pipeline prefetches "
                               f"{self.depth})")
        encoded, boxes, flips = self._inputs[0]
        try:
            images = self.pipe.take()
        except RuntimeError:
            self._inputs.popleft()
            rows = self._fallback(encoded, boxes, flips)
            self.pipe.reset()
            for args in self._inputs:  # feed the chunks behind it again; the next submit starts the new pipe
                self.pipe.feed(*args)
            return rows
        self._inputs.popleft()
        self.images_decoded += len(encoded)
        return list(images)

    def _fallback(self, encoded, boxes, flips) -> list[torch.Tensor | BadSample]:
        self.fallbacks += 1
        images, bad = self.fallback.decode(encoded, boxes, flips)
        self.images_decoded += len(encoded)
        if images.device != self.device:
            from m2megatron.parallel.device import to_device

            images = to_device({"images": images}, self.device)["images"]
        good = iter(images)
        return [bad[j] if j in bad else next(good) for j in range(len(encoded))]

    def reset(self) -> None:
        """Drop the chunks in flight."""
        self._inputs.clear()
        self.pipe.reset()

    def close(self) -> None:
        self.reset()
        self.fallback.close()
