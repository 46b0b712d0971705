"""Activation recompute (selective core attention; full, uniform and block) changes nothing but memory.

One process, fp32, drop-path on: every mode gives the loss and the parameter gradients of the run
without recompute, exactly. Counting forward calls shows each mode re-runs what it should in backward
(so the equality is not vacuous), and with Megatron's RNG restore switched off the gradients differ:
the recomputed forward replays the drop-path masks only because Megatron's checkpoint restores the
RNG states.
"""

import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from m2megatron.config import preset
from m2megatron.models import M2Encoder, init_weights
from m2megatron.models.recompute import recomputed_layers
from m2megatron.parallel import seed_everything
from tests.reference_model import sample_inputs, single_groups

pytestmark = pytest.mark.unit

CFG = dataclasses.replace(preset("tiny"), num_layers=3, num_vl_layers=2, drop_path_rate=0.3, max_text_len=12)
MODES = {
    "none": {},
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block-2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


def _step(overrides: dict, cfg=CFG):
    """Loss, gradients and forward-call counts (layers, core attention) of one forward+backward."""
    model = M2Encoder(cfg, single_groups(), **overrides)
    init_weights(model, 5)
    model.train()
    calls = {"layer": 0, "core_attention": 0}

    def count(kind):
        def hook(*_):
            calls[kind] += 1
        return hook

    for stack in (model.vision_layers, model.text_layers, model.vl_layers):
        for layer in stack.values():
            layer.register_forward_hook(count("layer"))
            layer.self_attention.core_attention.register_forward_hook(count("core_attention"))
    images, ids, mask = sample_inputs(cfg)
    seed_everything(11, single_groups())  # the drop-path draws (Megatron's data-parallel stream)
    out = model(images=images, text_ids=ids, text_mask=mask)
    logits = out.image @ out.text.t() * out.logit_scale.exp()
    labels = torch.arange(logits.shape[0])
    loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls


@pytest.fixture(scope="module")
def reference():
    return _step(MODES["none"])


def _expected_calls(mode: str) -> dict:
    """Forward calls: each layer once per stack pass (towers once, VL once per modality), plus its re-runs."""
    passes = 2 * CFG.num_layers + 2 * CFG.num_vl_layers
    overrides = MODES[mode]
    if overrides.get("recompute_granularity") == "selective":
        return {"layer": passes, "core_attention": 2 * passes}
    if overrides.get("recompute_granularity") == "full":
        method, n = overrides["recompute_method"], overrides["recompute_num_layers"]
        again = 2 * recomputed_layers(CFG.num_layers, method, n) + 2 * recomputed_layers(CFG.num_vl_layers, method, n)
        return {"layer": passes + again, "core_attention": passes + again}
    return {"layer": passes, "core_attention": passes}


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_recompute_gives_the_same_loss_and_gradients(reference, mode):
    ref_loss, ref_grads, ref_calls = reference
    assert ref_calls == _expected_calls("none")
    loss, grads, calls = _step(MODES[mode])
    assert calls == _expected_calls(mode), "the mode did not re-run what it should"
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    different = [k for k in ref_grads if not torch.equal(grads[k], ref_grads[k])]
    assert different == [], different


def test_drop_path_masks_are_replayed_only_because_megatron_restores_the_rng(reference):
    from megatron.core.tensor_parallel import random as mrandom

    ref_loss, ref_grads, _ = reference
    with torch.no_grad():  # drop-path is active: another draw gives another loss
        assert _step_loss_with_seed(12) != ref_loss
    with mock.patch.object(mrandom, "_set_all_rng_states", lambda *states: None):
        _, grads, _ = _step(MODES["full-uniform-1"])
    assert any(not torch.allclose(grads[k], ref_grads[k]) for k in ref_grads)


def _step_loss_with_seed(seed: int) -> float:
    model = M2Encoder(CFG, single_groups())
    init_weights(model, 5)
    model.train()
    images, ids, mask = sample_inputs(CFG)
    seed_everything(seed, single_groups())
    out = model(images=images, text_ids=ids, text_mask=mask)
    logits = out.image @ out.text.t() * out.logit_scale.exp()
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).item()


def test_recompute_with_sdpa_attention_gives_the_same_gradients():
    cfg = dataclasses.replace(CFG, attention="sdpa")
    _, ref, _ = _step(MODES["none"], cfg)
    for mode in ("selective", "full-block-2"):
        _, grads, _ = _step(MODES[mode], cfg)
        assert all(torch.equal(grads[k], ref[k]) for k in ref), mode
