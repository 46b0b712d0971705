"""Image checks and the PIL preprocessing path (the reference's eval transform, and the train crop/flip).

Eval preprocessing is the reference's `square_transform`: a bicubic squash of the whole image to
S×S with no crop, then (x/255 − 0.5)/0.5 → float32 CHW in [−1, 1]. Training augmentation is a random
resized crop (area scale and aspect ratio drawn per sample) and a horizontal flip; the crop window is
a *relative* box and is applied inside the resize, exactly as the DALI path does, so both decoders
give the same output up to interpolation and JPEG-decoder differences.

The training loader keeps its images as uint8 CHW (`normalize=False`): a quarter of the bytes to the device
and over the TP broadcast. `normalize_images` normalizes them there, bit for bit as `normalize_uint8` does on
the host (the eval path, unchanged).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from m2megatron.data.skips import BadSample

if TYPE_CHECKING:
    import torch

FULL_BOX = (0.0, 0.0, 1.0, 1.0)  # relative (x0, y0, x1, y1)


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Images outside these limits are skipped as `extreme_size`."""

    min_side: int = 8
    max_pixels: int = 60_000_000
    max_aspect: float = 20.0

    def check(self, width: int, height: int) -> None:
        if min(width, height) < self.min_side or width * height > self.max_pixels \
                or max(width, height) > self.max_aspect * min(width, height):
            raise BadSample("extreme_size", f"{width}x{height}")


@dataclass(frozen=True, kw_only=True)
class Augment:
    """Random resized crop (relative area in `scale`, aspect ratio in `ratio`) and horizontal flip."""

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def draw(self, rng: np.random.Generator) -> tuple[tuple[float, float, float, float], bool]:
        """A relative crop box (x0, y0, x1, y1) and a flip flag."""
        box = FULL_BOX
        for _ in range(10):
            area = rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if w <= 1.0 and h <= 1.0:
                x0, y0 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
                box = (x0, y0, x0 + w, y0 + h)
                break
        return box, bool(self.flip and rng.integers(2))


def probe_image(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """Cheap header check of encoded image bytes; returns (width, height) or raises BadSample."""
    if len(data) == 0:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            size, fmt = im.size, im.format
    except Image.DecompressionBombError as exc:
        raise BadSample("extreme_size", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for garbage input
        if data.startswith(_JPEG_SOI) and not _has_jpeg_eoi(data):
            raise BadSample("truncated_image", "JPEG cut short inside its header") from None
        raise BadSample("corrupt_image", type(exc).__name__) from None
    limits.check(*size)
    if fmt == "JPEG" and not _has_jpeg_eoi(data):
        raise BadSample("truncated_image", "no JPEG end-of-image marker")
    return size


_JPEG_SOI = b"\xff\xd8\xff"


def _has_jpeg_eoi(data: bytes) -> bool:
    # A JPEG ends with the EOI marker (FF D9), which cannot occur inside entropy-coded data, so a
    # missing marker near the end means the file was cut short. Trailing junk after EOI is tolerated.
    return data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) >= 0


def decode_pil(data: bytes, limits: ImageLimits, probe: bool = True) -> Image.Image:
    """Fully decode image bytes to RGB with PIL, or raise BadSample. probe=False skips the header check
    (the training loader has made it already)."""
    if probe:
        probe_image(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")  # no copy of an RGB image
    except OSError as exc:
        reason = "truncated_image" if "truncated" in str(exc) else "decode_error"
        raise BadSample(reason, str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise BadSample("decode_error", f"{type(exc).__name__}: {exc}") from None


def normalize_uint8(arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC → float32 CHW in [−1, 1]: (x/255 − 0.5)/0.5, computed as (x − 127.5)/127.5 in float32.

    `out` (float32 [3, H, W], e.g. a row of a shared-memory buffer) receives the result without temporaries.
    """
    chw = arr.transpose(2, 0, 1)
    if out is None:
        out = np.empty(chw.shape, np.float32)
    np.subtract(chw, np.float32(127.5), out=out, dtype=np.float32)
    np.divide(out, np.float32(127.5), out=out)
    return out


def to_chw_uint8(arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC → uint8 CHW, contiguous (into `out`, uint8 [3, H, W], when given)."""
    chw = arr.transpose(2, 0, 1)
    if out is None:
        return np.ascontiguousarray(chw)
    out[...] = chw
    return out


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) → float32 in [−1, 1] on their device, bit for bit `normalize_uint8`: x − 127.5
    is exact in float32 and the division is IEEE-rounded. The divisor is a tensor on the images' device because
    torch turns a division by a Python scalar into a multiplication by its reciprocal on CUDA (up to 1 ulp off).
    Float images (already normalized) are returned as they are. (torch is imported here: decode workers import
    this module and start in a fraction of a second without it.)"""
    import torch

    if images.dtype != torch.uint8:
        return images
    half = torch.full((), 127.5, dtype=torch.float32, device=images.device)  # a fill: no host-to-device copy
    return (images.float() - half) / half


def preprocess_pil(im: Image.Image, size: int, box=FULL_BOX, flip: bool = False,
                   out: np.ndarray | None = None, normalize: bool = True) -> np.ndarray:
    """Bicubic resize of the relative `box` of `im` to size×size (+ optional flip) → float32 [3, size, size]
    in [−1, 1], or uint8 [3, size, size] with normalize=False (written into `out` when given)."""
    w, h = im.size
    pixel_box = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    arr = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=pixel_box))
    if flip:
        arr = arr[:, ::-1]
    return normalize_uint8(arr, out) if normalize else to_chw_uint8(arr, out)


def eval_preprocess(im: Image.Image, size: int) -> np.ndarray:
    """The reference eval transform of an RGB PIL image: squash to size×size bicubic, no crop, [−1, 1] CHW."""
    return preprocess_pil(im.convert("RGB"), size)
