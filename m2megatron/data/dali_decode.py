"""The DALI decode pipeline: encoded bytes → decode → (crop inside) bicubic resize → flip → normalize.

`fn.external_source` feeds the encoded images of one batch together with a relative crop box and a
flip flag per sample, so the Python reader keeps control of order, skipping and the resumable
position. The decoder is `fn.decoders.image(device="mixed")` on a GPU (nvJPEG; output is a CUDA
tensor) and `device="cpu"` with `device_id=None` on CPU (a GPU device id fails without a driver).
The resize is `INTERP_CUBIC` with antialiasing over the region of interest, matching the PIL path's
`Image.resize(BICUBIC, box=...)`; normalization is (x − 127.5)/127.5 = (x/255 − 0.5)/0.5, CHW.

The pipeline runs synchronously (no DALI prefetch), one `run()` per batch: the loader's own
background thread provides the overlap, and a failure stays attached to its batch.
"""

from __future__ import annotations

import numpy as np
import torch

FULL_ROI = (np.zeros(2, np.float32), np.ones(2, np.float32))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


class DaliPipeline:
    """One DALI pipeline for batches of up to `max_batch` images of output size `size`×`size`."""

    def __init__(self, size: int, max_batch: int, num_threads: int = 1, gpu: bool = False):
        self.size, self.max_batch, self.num_threads, self.gpu = size, max_batch, num_threads, gpu
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        size, gpu = self.size, self.gpu

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=self.device.index if gpu else None,
                      exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT)  # (y, x), relative
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC,
                               antialias=True, roi_start=roi_start, roi_end=roi_end, roi_relative=True)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)

        p = pipe()
        p.build()
        return p

    def run(self, encoded: list[bytes], boxes: list[tuple[float, float, float, float]],
            flips: list[bool]) -> torch.Tensor:
        """Decode one batch → float32 [n, 3, size, size] on this pipeline's device. Raises on any failure."""
        if not 0 < len(encoded) <= self.max_batch:
            raise ValueError(f"DALI batch of {len(encoded)} images (max {self.max_batch})")
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        p.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        p.feed_input("roi_start", [np.array((b[1], b[0]), np.float32) for b in boxes])
        p.feed_input("roi_end", [np.array((b[3], b[2]), np.float32) for b in boxes])
        p.feed_input("mirror", [np.array(int(f), np.int32) for f in flips])
        (out,) = p.run()
        dense = out.as_tensor()
        if not self.gpu:
            return torch.from_numpy(np.array(dense))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(self.device))
        return result

    def reset(self) -> None:
        """Drop the pipeline (after an error its state is undefined); the next run builds a new one."""
        self._pipe = None
