"""On a GPU: uint8 images normalized on the device (data.image.normalize_images) equal the host's float path bit
for bit, for all 256 values (CUDA's division by a tensor is IEEE-rounded; by a Python scalar torch would multiply
by the reciprocal instead, up to 1 ulp off)."""

import numpy as np
import pytest
import torch

from m2megatron.data.image import normalize_images, normalize_uint8

pytestmark = pytest.mark.gpu


def test_device_normalization_equals_host_for_every_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    want = torch.from_numpy(normalize_uint8(values))
    got = normalize_images(torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))).cuda()).cpu()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
