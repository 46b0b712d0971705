"""The released checkpoint layout: key/shape table, QKV fusion, import errors, wrappers, safety, round trips."""

import json

import pytest
import torch

from m2megatron.checkpoint.files import (
    load_any,
    read_consolidated,
    read_reference_checkpoint,
    save_consolidated,
)
from m2megatron.checkpoint.reference_format import (
    fuse_qkv,
    infer_model_config,
    ours_to_reference,
    reference_shapes,
    reference_to_ours,
    split_qkv,
)
from m2megatron.cli import UserError
from m2megatron.config import preset
from tests.reference_model import tiny_reference, torchscale_available

pytestmark = pytest.mark.unit
needs_torchscale = pytest.mark.skipif(not torchscale_available(), reason="torchscale==0.3.0 is not installed")


@pytest.mark.parametrize("name,ours", [("Encoder_0.4B", "m2-0.4b"), ("Encoder_1B", "m2-1b"),
                                       ("Encoder_10B", "m2-10b")])
def test_reference_shapes_equal_the_released_dump(reference_dir, name, ours):
    released = json.loads((reference_dir / "state_dict_shapes.json").read_text())[name]
    assert list(reference_shapes(preset(ours)).items()) == list(released.items())


def test_fused_qkv_is_megatron_per_head_layout():
    heads, hd, d = 3, 2, 6
    q, k, v = (torch.arange(d * 4).reshape(d, 4) + 1000 * i for i in range(3))
    fused = fuse_qkv(q, k, v, heads)
    assert torch.equal(fused[0:hd], q[0:hd]) and torch.equal(fused[hd:2 * hd], k[0:hd])
    assert torch.equal(fused[2 * hd:3 * hd], v[0:hd]) and torch.equal(fused[3 * hd:4 * hd], q[hd:2 * hd])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads), (q, k, v)))


def _ref_state(seed=0):
    if torchscale_available():
        return tiny_reference(seed=seed).state_dict()
    cfg = preset("tiny")  # the same layout, from the shape table alone
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in reference_shapes(cfg).items()}


def test_round_trip_is_bit_identical_and_loads_strictly():
    ref = _ref_state()
    cfg = infer_model_config(ref)
    full, unused = reference_to_ours(ref, cfg)
    back = ours_to_reference(full, cfg, unused)
    assert list(back) == list(ref)
    vl_b = [k for k in ref if k.startswith("backbone_vl.") and ".B." in k]
    assert vl_b and all(torch.equal(back[k], ref[k]) for k in ref if k not in vl_b)
    assert all(torch.equal(back[k], back[k.replace(".B.", ".A.")]) for k in vl_b)
    if torchscale_available():
        tiny_reference().load_state_dict(back, strict=True)


def test_export_without_kept_unused_values_writes_documented_defaults():
    ref = _ref_state()
    cfg = infer_model_config(ref)
    full, _ = reference_to_ours(ref, cfg)
    back = ours_to_reference(full, cfg)
    assert back.keys() == ref.keys()
    assert torch.equal(back["norm.weight"], torch.ones(64)) and torch.equal(back["pooler.dense.weight"], torch.eye(64))
    assert torch.equal(back["itc_image_proj.fc.weight"], ref["itc_vl_image_proj.fc.weight"])
    assert torch.equal(back["logit_vl_scale"], ref["logit_scale"])


def test_import_lists_missing_unexpected_and_misshaped_keys():
    ref = _ref_state()
    cfg = infer_model_config(ref)
    ref.pop("backbone.encoder.layers.1.ffn.B.fc2.bias")
    ref["itc_teacher.weight"] = torch.zeros(2)
    ref["backbone.vision_embed.cls_token"] = torch.zeros(1, 1, 63)
    with pytest.raises(ValueError) as err:
        reference_to_ours(ref, cfg)
    text = str(err.value)
    assert "missing (1): backbone.encoder.layers.1.ffn.B.fc2.bias" in text
    assert "unexpected (1): itc_teacher.weight" in text and "misshaped (1): backbone.vision_embed.cls_token" in text


def test_heads_come_from_flag_preset_or_width():
    ref = _ref_state()
    assert infer_model_config(ref).num_attention_heads == 4  # width 64 = the tiny preset
    assert infer_model_config(ref, num_heads=8).num_attention_heads == 8
    cfg = infer_model_config(ref)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_vl_layers, cfg.image_size, cfg.patch_size) == (64, 2, 1, 32, 8)


@pytest.mark.parametrize("wrap", ["state_dict", "module", "model", "deepspeed_flat", "plain"])
def test_reader_unwraps_like_the_reference_loader(tmp_path, wrap):
    ref = {"logit_scale": torch.tensor(1.0), "backbone.text_embed.weight": torch.ones(2, 2)}
    inner = dict(ref, **{"visual_tokenizer.quantize.embedding.weight": torch.zeros(3)})
    if wrap in ("module", "deepspeed_flat"):
        inner = {"_forward_module." + k: v for k, v in inner.items()}
    obj = {wrap: inner, "epoch": 3} if wrap in ("state_dict", "module", "model") else inner
    torch.save(obj, tmp_path / "m.ckpt")
    got = read_reference_checkpoint(tmp_path / "m.ckpt")
    assert got.keys() == ref.keys()


class _Evil:
    pass


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper": _Evil()}, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="refusing to load"):
        read_reference_checkpoint(tmp_path / "bad.ckpt")


def test_consolidated_file_round_trip(tmp_path):
    ref = _ref_state()
    cfg = infer_model_config(ref)
    full, unused = reference_to_ours(ref, cfg)
    save_consolidated(tmp_path / "m.safetensors", full, cfg, unused)
    cfg2, full2, unused2 = read_consolidated(tmp_path / "m.safetensors")
    assert cfg2 == cfg
    assert all(torch.equal(full[k], full2[k]) for k in full) and full.keys() == full2.keys()
    assert all(torch.equal(unused[k], unused2[k]) for k in unused)
    torch.save({"state_dict": ref}, tmp_path / "r.ckpt")
    cfg3, full3, _ = load_any(tmp_path / "r.ckpt")
    assert cfg3 == cfg and all(torch.equal(full[k], full3[k]) for k in full)
