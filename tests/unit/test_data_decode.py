"""DALI (CPU) and PIL decoding agree; the eval transform is the reference's bicubic squash."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from m2megatron.data.decode import DaliDecoder, PilDecoder, build_decoder
from m2megatron.data.image import FULL_BOX, Augment, ImageLimits, eval_preprocess
from m2megatron.data.shard_writer import encode_jpeg
from m2megatron.data.synthetic import SyntheticScenes

pytestmark = pytest.mark.unit
LIMITS = ImageLimits()


def _jpegs():
    yy, xx = np.mgrid[0:150, 0:260]
    grad = np.stack([xx * 255 // 259, yy * 255 // 149, (xx + yy) % 256], -1).astype(np.uint8)
    grad[20:60, 30:120] = (250, 20, 20)
    scenes = SyntheticScenes(seed=2, image_size=96)
    return [encode_jpeg(grad)] + [encode_jpeg(scenes[i].image) for i in range(3)]


@pytest.fixture(scope="module")
def dali_cpu():
    pytest.importorskip("nvidia.dali")
    return DaliDecoder(48, LIMITS, max_batch=8, gpu=False)


def test_dali_cpu_matches_pil_eval_and_augment(dali_cpu):
    jpegs = _jpegs()
    pil = PilDecoder(48, LIMITS, num_threads=2)
    rng = np.random.default_rng(0)
    aug = [Augment().draw(rng) for _ in jpegs]
    for boxes, flips in (([FULL_BOX] * 4, [False] * 4), ([a[0] for a in aug], [True, False, True, False])):
        a, bad_a = dali_cpu.decode(jpegs, boxes, flips)
        b, bad_b = pil.decode(jpegs, boxes, flips)
        assert not bad_a and not bad_b and a.shape == b.shape == (4, 3, 48, 48)
        diff = (a - b).abs()
        # JPEG decoders (IDCT/upsampling) and the cubic kernels differ slightly (measured: mean 0.001,
        # max 0.03 = 4/255); a wrong box, flip or order gives differences of order 1
        assert float(diff.mean()) < 0.005 and float(diff.max()) < 0.08, (float(diff.mean()), float(diff.max()))
    assert dali_cpu.fallbacks == 0


def test_eval_preprocess_is_reference_squash(reference_dir):
    im = Image.open(reference_dir / "pokemon.jpeg").convert("RGB")
    x = eval_preprocess(im, 224)
    ref = np.asarray(im.resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255.0
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x, ((ref - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)


def test_eval_on_reference_image_dali_vs_pil(reference_dir, dali_cpu):
    data = (reference_dir / "pokemon.jpeg").read_bytes()
    a, _ = dali_cpu.decode([data], [FULL_BOX], [False])
    b = eval_preprocess(Image.open(io.BytesIO(data)), 48)
    assert float((a[0] - b).abs().mean()) < 0.01


def test_augment_draws_valid_boxes():
    rng = np.random.default_rng(1)
    for _ in range(200):
        (x0, y0, x1, y1), _flip = Augment(scale=(0.8, 1.0)).draw(rng)
        assert 0 <= x0 < x1 <= 1 + 1e-9 and 0 <= y0 < y1 <= 1 + 1e-9
        assert 0.8 - 1e-9 <= (x1 - x0) * (y1 - y0) <= 1 + 1e-9
    assert Augment(flip=False).draw(rng)[1] is False


def test_build_decoder_choices():
    assert build_decoder("pil", 32, LIMITS, 4).name == "pil"
    assert build_decoder("auto", 32, LIMITS, 4, gpu=False).name == "pil"  # PIL is cheaper per core on a CPU
    with pytest.raises(ValueError, match="data.decoder"):
        build_decoder("opencv", 32, LIMITS, 4)
