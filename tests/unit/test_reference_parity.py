"""Our model with imported weights equals the reference architecture (PyPI torchscale 0.3.0, SPEC.md §7)
to 1e-5 in fp32: the tiny preset and a reduced-depth m2-0.4b-shaped model, on random images and on real
bilingual captions tokenized with the released sp.model."""

import json

import pytest
import torch

from m2megatron.checkpoint.reference_format import infer_model_config, reference_to_ours
from m2megatron.models import M2Encoder, load_full_state_dict
from tests.reference_model import ReferenceM2, randomize_, single_groups, tiny_reference, torchscale_available

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not torchscale_available(), reason="torchscale==0.3.0 is not installed")]
TOL = 1e-5


def _ours(reference, **infer):
    cfg = infer_model_config(reference.state_dict(), **infer)
    full, _ = reference_to_ours(reference.state_dict(), cfg)
    model = M2Encoder(cfg, single_groups()).eval()
    load_full_state_dict(model, full)
    return model


def _captions(reference_dir, per_file=4):
    texts = ["皮卡丘", "杰尼龟", "a photo of a cat", "two  spaces and a trailing space "]
    for name in ("coco-cn_test.jsonl", "coco_caption_karpathy_test.jsonl"):
        with open(reference_dir / name, encoding="utf-8") as f:
            for line, _ in zip(f, range(per_file)):
                texts.append(json.loads(line)["caption"][0])
    return texts


def _tokenize(reference_dir, texts):
    from m2megatron.data.tokenizer import Tokenizer

    return Tokenizer(reference_dir / "sp.model", max_length=52).encode(texts)


def _random_text(b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 115244, (b, 52), generator=gen)
    lengths = torch.tensor([52, 30, 3, 1][:b])
    mask = (torch.arange(52)[None] < lengths[:, None]).long()
    return ids, mask


def _images(b, size, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _assert_parity(ours, reference, images, ids, mask):
    with torch.no_grad():
        img = (ours.encode_image(images) - reference.encode_image(images)).abs().max().item()
        txt = (ours.encode_text(ids, mask) - reference.encode_text(ids, mask)).abs().max().item()
    assert img <= TOL and txt <= TOL, f"image diff {img}, text diff {txt}"


def test_tiny_parity_random_inputs():
    reference = tiny_reference(seed=1)
    _assert_parity(_ours(reference), reference, _images(4, 32), *_random_text(4))


def test_tiny_parity_real_bilingual_captions(reference_dir):
    reference = tiny_reference(seed=2, layers=3, vl_layers=2)
    ids, mask = _tokenize(reference_dir, _captions(reference_dir))
    _assert_parity(_ours(reference), reference, _images(2, 32), ids, mask)


def test_reduced_depth_m2_0p4b_shape_parity(request):
    reference = ReferenceM2(dim=768, layers=1, heads=12, out_dim=768, vl_layers=1).eval()
    randomize_(reference, seed=3)
    ours = _ours(reference, preset="m2-0.4b")
    assert ours.cfg.num_attention_heads == 12 and ours.cfg.image_size == 224
    try:
        reference_dir = request.getfixturevalue("reference_dir")
        ids, mask = _tokenize(reference_dir, _captions(reference_dir, per_file=2))
    except pytest.skip.Exception:
        ids, mask = _random_text(4)
    _assert_parity(ours, reference, _images(2, 224), ids, mask)
