"""Single-process properties of the contrastive loss: the tiled cross-entropy, chunked vs dense, clamp, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from m2megatron_kernels import tiled_ce_reference

from m2megatron.config import ConfigError, LossConfig
from m2megatron.loss import contrastive_loss, effective_logit_scale, tiled_clip_cross_entropy
from m2megatron.loss.collectives import gather_pairs_with_grad
from m2megatron.loss.tiled_ce import resolve_kernel

pytestmark = pytest.mark.unit


def normalized(rows, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def grads_of(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


def assert_close_all(got, want, rel):
    for g, w in zip(got, want):
        err = ((g.double() - w.double()).abs().max() / w.double().abs().max()).item()
        assert err < rel, err


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("tile,row_offset,smoothing", [(4, 0, 0.0), (5, 6, 0.1), (64, 3, 0.2), (1, 13, 0.0)])
def test_tiled_cross_entropy_equals_dense(dtype, rel, tile, row_offset, smoothing):
    image, text = normalized(7, 9, dtype), normalized(7, 9, dtype, seed=2)
    pairs = torch.stack([normalized(20, 9, dtype, seed=1), normalized(20, 9, dtype, seed=3)], dim=1)  # [n, 2, d]
    labels = torch.arange(row_offset, row_offset + 7)
    weights = torch.linspace(0.5, 2.0, 14, dtype=dtype).reshape(2, 7)  # a non-uniform upstream gradient

    def dense(image, text, pairs, s):
        i2t = F.cross_entropy(s * image @ pairs[:, 1].T, labels, label_smoothing=smoothing, reduction="none")
        t2i = F.cross_entropy(s * text @ pairs[:, 0].T, labels, label_smoothing=smoothing, reduction="none")
        return (torch.stack([i2t, t2i]) * weights).sum()

    def tiled(image, text, pairs, s):
        per_row = tiled_clip_cross_entropy(image, text, pairs, s, row_offset=row_offset, label_smoothing=smoothing,
                                           tile=tile, kernel="torch")
        return (per_row * weights).sum()

    inputs = (image, text, pairs, torch.tensor(12.0, dtype=dtype))
    assert_close_all(grads_of(tiled, *inputs), grads_of(dense, *inputs), rel)


def test_tiled_cross_entropy_upcasts_bf16_inputs():
    q, k = normalized(6, 16, torch.bfloat16), normalized(11, 16, torch.bfloat16, seed=1)
    scale = torch.tensor(14.0)
    per_row, _, _ = tiled_ce_reference.ce_forward(q, k, scale, 2, 0.0, tile=4)
    want = F.cross_entropy(scale * q.float() @ k.float().T, torch.arange(2, 8), reduction="none")
    assert per_row.dtype == torch.float32
    torch.testing.assert_close(per_row, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_chunked_loss_equals_dense_loss(dtype, rel):
    image, text = normalized(10, 8, dtype), normalized(10, 8, dtype, seed=1)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)

    def loss(chunk_size):
        config = LossConfig(chunk_size=chunk_size, label_smoothing=0.1)
        return lambda i, t, s: contrastive_loss(i, t, s, group=None, config=config)

    want = grads_of(loss(None), image, text, log_scale)
    for chunk_size in (1, 3, 10, 1000):
        assert_close_all(grads_of(loss(chunk_size), image, text, log_scale), want, rel)


def test_logit_scale_is_clamped_with_zero_gradient_above_the_bound():
    image, text = normalized(4, 8), normalized(4, 8, seed=1)
    config = LossConfig(logit_scale_max=math.log(100.0))
    above = grads_of(lambda s: contrastive_loss(image, text, s, group=None, config=config),
                     torch.tensor(math.log(500.0), dtype=torch.float64))
    at_bound = contrastive_loss(image, text, torch.tensor(math.log(100.0), dtype=torch.float64), group=None)
    assert above[0].item() == pytest.approx(at_bound.item(), rel=1e-12)
    assert above[1].item() == 0.0
    assert effective_logit_scale(torch.tensor(math.log(1 / 0.07)), math.log(100.0)).item() == pytest.approx(1 / 0.07)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="loss.kernel"):
        LossConfig(kernel="triton").validate()
    with pytest.raises(ConfigError, match="loss.logit_scale_max"):
        LossConfig(logit_scale_max=math.inf).validate()
    with pytest.raises(ValueError, match="loss.kernel"):
        resolve_kernel("cuda-magic", torch.device("cpu"))
    with pytest.raises(ValueError, match="same shape"):
        gather_pairs_with_grad(torch.zeros(2, 4), torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match="outside"):
        tiled_clip_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4, 2, 4), torch.tensor(1.0),
                                 row_offset=2, tile=2)


def test_triton_kernel_is_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_kernel("triton", torch.device("cpu"))
    assert resolve_kernel("auto", torch.device("cpu")) is tiled_ce_reference
