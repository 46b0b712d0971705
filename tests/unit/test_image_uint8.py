"""Training images travel as uint8 and are normalized on the device: bit for bit the host's float path.

normalize_images computes (x − 127.5)/127.5 in float32 as normalize_uint8 does on the host: the subtraction is
exact and the division IEEE-rounded in both, so every one of the 256 values (hence every image) is identical.
(The reference's (x/255 − 0.5)/0.5 rounds twice and may differ from both by 1 ulp: tests/unit/test_data_decode.py.)
tests/gpu/test_uint8_images.py checks the same on CUDA."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from m2megatron.data.decode import PilDecoder
from m2megatron.data.image import FULL_BOX, ImageLimits, normalize_images, normalize_uint8
from m2megatron.data.synthetic import SyntheticScenes

pytestmark = pytest.mark.unit


def test_every_uint8_value_normalizes_bit_for_bit_as_the_host_float_path():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)  # HWC
    want = torch.from_numpy(normalize_uint8(values))
    got = normalize_images(torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))))
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert normalize_images(want) is want  # already normalized: passed through


def test_raw_decoder_then_device_normalization_equals_the_float_decoder():
    scenes = SyntheticScenes(seed=2, image_size=40)
    jpegs = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(scenes[i].image).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    boxes, flips = [FULL_BOX, (0.1, 0.2, 0.8, 0.9)] * 2, [False, True, True, False]
    raw, _ = PilDecoder(24, ImageLimits(), raw=True).decode(jpegs, boxes, flips)
    floats, _ = PilDecoder(24, ImageLimits()).decode(jpegs, boxes, flips)
    assert raw.dtype == torch.uint8 and raw.element_size() * 4 == floats.element_size()
    assert torch.equal(normalize_images(raw), floats)
