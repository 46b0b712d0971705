"""On a GPU: the SDPA core attention (model.attention='sdpa') runs on the fused kernels it is meant to, and
agrees with the math kernel and with Megatron-Core's DotProductAttention.

- bf16, no mask (the vision tower without SP padding): FlashAttention alone must accept the call;
- bf16 with our additive key-padding mask (text, VL, SP padding): the memory-efficient kernel alone must;
- both match torch's math kernel and Megatron's DotProductAttention (bf16 tolerance), forward and
  input gradients, at the m2-0.4b head shape (12 heads × 64) with 197 image / 52 text tokens;
- left to torch's dispatcher, the calls run a fused kernel (flash, memory-efficient or cuDNN), never
  the math fallback (the profiler's op names say which; the test prints them as "[figure] attention kernel"
  lines, which the GPU check's summary carries).

Skipped without CUDA (tests/conftest.py); run by tests/gpu/run.sh.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.figures import attention_line

pytestmark = pytest.mark.gpu
TOL = 2e-2  # bf16 attention outputs are O(1): ~3 significant digits


def _modules(masked: bool):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from m2megatron.config import ParallelConfig, preset
    from m2megatron.models import transformer_config
    from m2megatron.models.sdpa_attention import SDPAttention
    from m2megatron.parallel import initialize, seed_everything

    groups = initialize(ParallelConfig())
    seed_everything(0, groups)
    cfg = preset("m2-0.4b")
    config = transformer_config(cfg, params_dtype=torch.bfloat16)
    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.padding if masked else AttnMaskType.no_mask,
              attention_type="self", pg_collection=groups.collection)
    return cfg, SDPAttention(**kw), DotProductAttention(**kw)


def _inputs(cfg, masked: bool, batch: int = 4):
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = cfg.max_text_len if masked else cfg.num_image_tokens
    shape = (s, batch, cfg.num_attention_heads, cfg.head_dim)  # [s, b, np, hn]
    qkv = [torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3)]
    mask = None
    if masked:
        lengths = torch.randint(2, s + 1, (batch,), device="cuda", generator=gen)
        mask = (torch.arange(s, device="cuda")[None] >= lengths[:, None])[:, None, None, :]
    return qkv, mask


def _forward_backward(module, qkv, mask, backend=None):
    from torch.nn.attention import sdpa_kernel

    q, k, v = (t.clone().requires_grad_() for t in qkv)
    ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
    with ctx:
        out = module(q, k, v, mask)
        out.float().square().sum().backward()
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


def _assert_close(got, want):
    out, grads = got
    ref_out, ref_grads = want
    assert (out - ref_out).abs().max().item() <= TOL
    for g, r in zip(grads, ref_grads):
        scale = r.abs().max().item()
        assert (g - r).abs().max().item() <= TOL * max(scale, 1.0)


@pytest.mark.parametrize("masked,fused", [(False, "FLASH_ATTENTION"), (True, "EFFICIENT_ATTENTION")],
                         ids=["no-mask-flash", "padding-mask-memory-efficient"])
def test_sdpa_runs_on_the_fused_kernel_and_matches_math_and_megatron(masked, fused):
    from torch.nn.attention import SDPBackend

    cfg, sdpa, megatron = _modules(masked)
    qkv, mask = _inputs(cfg, masked)
    got = _forward_backward(sdpa, qkv, mask, getattr(SDPBackend, fused))  # raises if that kernel refuses
    _assert_close(got, _forward_backward(sdpa, qkv, mask, SDPBackend.MATH))
    _assert_close(got, _forward_backward(megatron, qkv, mask))


def test_flash_refuses_a_mask_so_masked_calls_need_the_memory_efficient_kernel():
    from torch.nn.attention import SDPBackend

    cfg, sdpa, _ = _modules(True)
    qkv, mask = _inputs(cfg, True)
    with pytest.raises(RuntimeError):
        _forward_backward(sdpa, qkv, mask, SDPBackend.FLASH_ATTENTION)


@pytest.mark.parametrize("masked,allowed", [(False, ("flash", "cudnn")), (True, ("efficient", "cudnn"))],
                         ids=["no-mask", "padding-mask"])
def test_default_dispatch_runs_a_fused_kernel_not_the_math_fallback(masked, allowed):
    from torch.profiler import ProfilerActivity, profile

    cfg, sdpa, _ = _modules(masked)
    qkv, mask = _inputs(cfg, masked)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _forward_backward(sdpa, qkv, mask)
    ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    print(attention_line("padding mask" if masked else "no mask", ops))
    assert not any("math" in op for op in ops), ops
    assert any(kind in op for op in ops for kind in allowed), ops
