"""Tensor parallelism on gloo reproduces TP=1: the TP-aware LayerNorm, the whole model (embeddings and
gathered gradients), pipeline stages at TP>1, imported reference weights, and a dist_checkpointing
save at TP=2 loaded at TP=1."""

import dataclasses
import multiprocessing

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from m2megatron.config import preset
from m2megatron.parallel import Layout, build_groups, seed_everything
from tests.reference_model import sample_inputs
from tests.tp_layer_norm import max_abs_diff, sharded_run, unsharded_case

pytestmark = pytest.mark.distributed
TOL = 1e-5


def _groups(tp):
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp))
    seed_everything(0, groups)
    return groups


def _tp_layernorm(tp, width):
    from m2megatron.models import TPLayerNorm

    groups = _groups(tp)
    inputs, want = unsharded_case(width)
    r, part = groups.tp_rank, width // tp
    sl = slice(r * part, (r + 1) * part)
    got = sharded_run(TPLayerNorm(width, eps=1e-5, tp_group=groups.tp), inputs, sl)
    return max_abs_diff(got, [want[0][..., sl], want[1][..., sl], want[2][sl], want[3][sl]])


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layernorm_equals_unsharded_layernorm(dist_pool, tp):
    assert max(dist_pool(4).run(_tp_layernorm, tp, 64)) <= TOL


def _embeddings_and_grads(cfg, tp):
    from m2megatron.models import M2Encoder, gather_full, init_weights

    groups = _groups(tp)
    model = M2Encoder(cfg, groups)
    init_weights(model, 11)
    images, ids, mask = sample_inputs(cfg)
    out = model(images=images, text_ids=ids, text_mask=mask)
    logits = out.image @ out.text.t() * out.logit_scale  # a CLIP-style loss with gradients of order 1
    labels = torch.arange(logits.shape[0])
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.image.detach(), out.text.detach(), gather_full(grads, cfg, groups.tp)


def _tp_model_parity(tp):
    cfg = preset("tiny")
    ref = _embeddings_and_grads(cfg, 1)
    got = _embeddings_and_grads(cfg, tp)
    diffs = {"image": (ref[0] - got[0]).abs().max().item(), "text": (ref[1] - got[1]).abs().max().item()}
    assert ref[2].keys() == got[2].keys()
    diffs["grad"] = max((ref[2][k] - got[2][k]).abs().max().item() for k in ref[2])
    return diffs


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_model_matches_tp1_embeddings_and_gradients(dist_pool, tp):
    for rank, diffs in enumerate(dist_pool(4).run(_tp_model_parity, tp)):
        assert max(diffs.values()) <= TOL, f"rank {rank}: {diffs}"


def _tp_stages_and_import():
    """At TP=2: a 2-stage chain, and reference weights imported (sliced per rank), both equal TP=1."""
    from m2megatron.checkpoint.reference_format import infer_model_config, reference_to_ours
    from m2megatron.models import M2Encoder, load_full_state_dict
    from tests.reference_model import tiny_reference

    reference = tiny_reference(seed=5, layers=3)
    cfg = infer_model_config(reference.state_dict())
    full, _ = reference_to_ours(reference.state_dict(), cfg)
    images, ids, mask = sample_inputs(cfg)
    groups = _groups(2)
    stages = [M2Encoder(cfg, groups, pre_process=True, post_process=False, layer_range=(0, 2)),
              M2Encoder(cfg, groups, pre_process=False, post_process=True, layer_range=(2, 3))]
    for stage in stages:
        load_full_state_dict(stage, full)
    with torch.no_grad():
        stages[1].set_input_tensor(stages[0](images=images, text_ids=ids, text_mask=mask))
        out = stages[1](text_mask=mask)
        ref_img, ref_txt = reference.encode_image(images), reference.encode_text(ids, mask)
    return max((out.image - ref_img).abs().max().item(), (out.text - ref_txt).abs().max().item())


def test_tp2_pipeline_stages_with_imported_reference_weights(dist_pool):
    assert max(dist_pool(2).run(_tp_stages_and_import)) <= TOL


def _dist_checkpoint_roundtrip(path):
    from megatron.core import dist_checkpointing

    from m2megatron.models import M2Encoder, full_state_dict, init_weights

    cfg = dataclasses.replace(preset("tiny"), num_layers=1)
    groups = _groups(2)
    saved = M2Encoder(cfg, groups)
    init_weights(saved, 21)
    # The torch_dist writer starts a multiprocessing Manager; pool workers are daemonic, which forbids children.
    proc = multiprocessing.current_process()
    daemon, proc._config["daemon"] = proc._config.get("daemon"), False
    try:
        dist_checkpointing.save(saved.sharded_state_dict(metadata={"dp_cp_group": groups.dp}), path)
    finally:
        proc._config["daemon"] = daemon
    expected = full_state_dict(saved)
    groups = _groups(1)
    loaded = M2Encoder(cfg, groups)
    with torch.no_grad():
        state = dist_checkpointing.load(loaded.sharded_state_dict(metadata={"dp_cp_group": groups.dp}), path)
        loaded.load_state_dict(state)
    got = full_state_dict(loaded)
    return [k for k in expected if not torch.equal(expected[k], got[k])]


def test_dist_checkpoint_saved_at_tp2_loads_at_tp1(dist_pool, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist_ckpt"))
    for rank, bad in enumerate(dist_pool(2).run(_dist_checkpoint_roundtrip, path)):
        assert bad == [], f"rank {rank}: differ after reload: {bad}"
