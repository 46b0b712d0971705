"""The SDPA core attention (model.attention='sdpa') against Megatron-Core's DotProductAttention, fp32 on CPU.

Same forward and input gradients with and without a key-padding mask, and the same model embeddings and
parameter gradients when a whole M2Encoder switches between the two. A sample whose keys are all masked
(no real token; our inputs always have the CLS token) gets a uniform distribution from both, no NaN; its
gradient differs by design: Megatron's masked_fill cuts it, our additive mask passes the softmax's.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from m2megatron.config import preset
from m2megatron.models import M2Encoder, init_weights, transformer_config
from m2megatron.models.sdpa_attention import SDPAttention
from tests.reference_model import sample_inputs, single_groups

pytestmark = pytest.mark.unit
TOL = 1e-6


def _pair(mask_type):
    cfg = preset("tiny")
    config = transformer_config(cfg)
    groups = single_groups().collection
    kw = dict(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self", pg_collection=groups)
    return cfg, DotProductAttention(**kw), SDPAttention(**kw)


def _qkv(cfg, s=9, b=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (s, b, cfg.num_attention_heads, cfg.head_dim)  # [s, b, np, hn]
    return [torch.randn(shape, generator=gen).requires_grad_() for _ in range(3)]


def _run_both(mask_type, mask, s, b):
    cfg, megatron, sdpa = _pair(mask_type)
    outs, grads = [], []
    for module in (megatron, sdpa):
        q, k, v = _qkv(cfg, s, b)
        out = module(q, k, v, mask)
        assert out.shape == (s, b, cfg.hidden_size)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    return outs, grads


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_sdpa_matches_megatron_dot_product_attention_forward_and_backward(masked):
    s, b = 9, 3
    mask = None
    if masked:
        lengths = torch.tensor([9, 4, 2])  # full and padded samples
        mask = (torch.arange(s)[None] >= lengths[:, None])[:, None, None, :]  # [b, 1, 1, s], True = masked
    outs, grads = _run_both(AttnMaskType.padding if masked else AttnMaskType.no_mask, mask, s, b)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=TOL)
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)


def test_sdpa_gives_a_sample_without_real_tokens_megatrons_uniform_attention_not_nan():
    s, b = 6, 2
    mask = (torch.arange(s)[None] >= torch.tensor([3, 0])[:, None])[:, None, None, :]  # sample 1: all masked
    outs, grads = _run_both(AttnMaskType.padding, mask, s, b)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=TOL)
    assert all(torch.isfinite(g).all() for g in grads[1])
    for ours, theirs in zip(grads[1], grads[0]):  # the sample with real tokens: same gradients
        torch.testing.assert_close(ours[:, 0], theirs[:, 0], rtol=0, atol=TOL)


def _embeddings_and_grads(cfg):
    model = M2Encoder(cfg, single_groups())
    init_weights(model, 3)
    images, ids, mask = sample_inputs(cfg)
    out = model(images=images, text_ids=ids, text_mask=mask)
    logits = out.image @ out.text.t() * out.logit_scale.exp()
    labels = torch.arange(logits.shape[0])
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).backward()
    return out.image.detach(), out.text.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_with_sdpa_attention_matches_megatron_attention():
    cfg = preset("tiny")
    ref = _embeddings_and_grads(dataclasses.replace(cfg, attention="megatron"))
    got = _embeddings_and_grads(dataclasses.replace(cfg, attention="sdpa"))
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-5)
    assert got[2].keys() == ref[2].keys()
    worst = max((got[2][k] - ref[2][k]).abs().max().item() for k in ref[2])
    assert worst <= 1e-5
