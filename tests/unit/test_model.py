"""M2Encoder on one process: shapes, masking, pipeline-stage chaining, state-dict helpers, meta-device build."""

import dataclasses

import pytest
import torch

from m2megatron.config import ConfigError, count_parameters, preset
from m2megatron.models import (
    M2Encoder,
    full_state_dict,
    init_weights,
    load_full_state_dict,
    merge_tp_shards,
    shard_full_state_dict,
)
from m2megatron.runtime.shapes import build_on_meta, per_rank_parameter_counts
from tests.reference_model import sample_inputs, single_groups

pytestmark = pytest.mark.unit


def _model(cfg, seed=1, **kw):
    model = M2Encoder(cfg, single_groups(), **kw)
    init_weights(model, seed)
    return model


def test_forward_shapes_norms_and_logit_scale():
    cfg = preset("tiny")
    model = _model(cfg)
    images, ids, mask = sample_inputs(cfg)
    out = model(images=images, text_ids=ids, text_mask=mask)
    assert out.image.shape == out.text.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(out.image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text.norm(dim=-1), torch.ones(3))
    assert out.logit_scale.item() == pytest.approx(cfg.logit_scale_init)
    torch.testing.assert_close(model.encode_image(images), out.image, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_text(ids, mask), out.text, rtol=0, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    cfg = preset("tiny")
    model = _model(cfg)
    images, ids, mask = sample_inputs(cfg)
    out = model(images=images, text_ids=ids, text_mask=mask)
    (out.image @ out.text.t() * out.logit_scale.exp()).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_padded_text_positions_do_not_matter():
    cfg = preset("tiny")
    model = _model(cfg)
    _, ids, mask = sample_inputs(cfg)
    other = torch.where(mask.bool(), ids, torch.randint_like(ids, 0, 1000))
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids, mask), model.encode_text(other, mask))


@pytest.mark.parametrize("ranges", [[(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)], [(0, 0), (0, 2), (2, 3)]])
def test_chained_pipeline_stages_reproduce_one_stage_exactly(ranges):
    cfg = dataclasses.replace(preset("tiny"), num_layers=3)
    whole = _model(cfg)
    full = full_state_dict(whole)
    images, ids, mask = sample_inputs(cfg)
    ref = whole(images=images, text_ids=ids, text_mask=mask)
    last = len(ranges) - 1
    stages = [M2Encoder(cfg, single_groups(), pre_process=s == 0, post_process=s == last, layer_range=r)
              for s, r in enumerate(ranges)]
    for stage in stages:
        load_full_state_dict(stage, full)
    hidden = stages[0](images=images, text_ids=ids, text_mask=mask)
    assert hidden.shape == (cfg.num_image_tokens + cfg.max_text_len, 3, cfg.hidden_size)  # packed [S, b, D]
    for stage in stages[1:]:
        stage.set_input_tensor([hidden])
        hidden = stage(text_mask=mask)
    assert torch.equal(hidden.image, ref.image) and torch.equal(hidden.text, ref.text)


def test_stage_state_dicts_use_global_layer_indices():
    cfg = dataclasses.replace(preset("tiny"), num_layers=3)
    stage = M2Encoder(cfg, single_groups(), pre_process=False, post_process=False, layer_range=(1, 3))
    keys = set(stage.state_dict())
    assert "vision_layers.2.input_layernorm.weight" in keys and "text_layers.1.mlp.linear_fc1.bias" in keys
    assert not any(k.startswith(("vision_layers.0.", "vl_layers.", "vision_embedding.", "logit_scale")) for k in keys)


def test_bad_layer_range_and_te_without_cuda_are_config_errors():
    cfg = preset("tiny")
    with pytest.raises(ConfigError, match="layer_range"):
        M2Encoder(cfg, single_groups(), layer_range=(1, 5))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="layer_spec: 'te' needs CUDA"):
            M2Encoder(dataclasses.replace(cfg, layer_spec="te"), single_groups())


def test_shard_then_merge_is_identity_and_pads_vocab():
    cfg = preset("tiny")
    full = full_state_dict(_model(cfg))
    shards = [shard_full_state_dict(full, cfg, r, 4) for r in range(4)]
    qkv = "vision_layers.0.self_attention.linear_qkv.weight"
    assert shards[1][qkv].shape == (3 * cfg.hidden_size // 4, cfg.hidden_size)
    assert shards[0]["text_embedding.word_embeddings.weight"].shape[0] == 115712 // 4
    merged = merge_tp_shards(shards, cfg)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)


def test_load_full_state_dict_lists_every_problem():
    cfg = preset("tiny")
    model = _model(cfg)
    full = full_state_dict(model)
    full.pop("vl_final_norm.bias")
    full["bogus.weight"] = torch.zeros(1)
    full["vision_projection.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        load_full_state_dict(model, full)
    text = str(err.value)
    assert "missing (1): vl_final_norm.bias" in text and "unexpected (1): bogus.weight" in text
    assert "misshaped (1): vision_projection.weight" in text


def test_drop_path_is_active_only_in_training():
    cfg = dataclasses.replace(preset("tiny"), drop_path_rate=0.5)
    model = _model(cfg)
    images, _, _ = sample_inputs(cfg)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.encode_image(images), model.encode_image(images))
        model.train()
        torch.manual_seed(0)
        a = model.encode_image(images)
        torch.manual_seed(1)
        b = model.encode_image(images)
    assert not torch.equal(a, b)


def test_meta_build_then_by_name_init_equals_eager_build():
    cfg = preset("tiny")
    eager = _model(cfg, seed=7)
    with torch.device("meta"):
        lazy = M2Encoder(cfg, single_groups())
    lazy.to_empty(device="cpu")
    init_weights(lazy, 7)
    a, b = full_state_dict(eager), full_state_dict(lazy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_state_dict_marks_tp_axes():
    model = _model(preset("tiny"))
    sharded = model.sharded_state_dict(metadata={"dp_cp_group": single_groups().dp})
    qkv = sharded["vision_layers.0.self_attention.linear_qkv.weight"]
    sub_ln = sharded["text_layers.1.mlp.linear_fc2.norm.weight"]
    assert qkv.axis_fragmentations[0] == 1 and sub_ln.global_shape == (256,)
    # local and te specs share checkpoint names for the pre-LNs
    fused_name = "vl_layers.0.self_attention.linear_qkv.layer_norm_weight"
    assert sharded["vl_layers.0.input_layernorm.weight"].key == fused_name
    assert "logit_scale" in sharded and "text_embedding.word_embeddings.weight" in sharded


def test_10b_builds_on_meta_and_tp8_rank_counts_add_up(capsys):
    cfg = preset("m2-10b")
    model = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    counts = per_rank_parameter_counts(cfg, tp_size=8)
    with capsys.disabled():
        print("\nm2-10b parameters per TP rank at TP=8:", counts["per_rank"])
    assert len(set(counts["per_rank"])) == 1
    assert counts["total_unique"] - counts["vocab_padding"] == count_parameters(cfg)["total"] == counts["expected"]
