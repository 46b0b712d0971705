"""Single-process properties of the ring exchange: its block arithmetic, G = 1, settings and the byte model.

The ring over G > 1 gloo ranks is tested in tests/distributed/test_loss_ring.py; here the arithmetic it
relies on is checked without processes: statistics of column blocks folded online, and backward per
block against the global log-sum-exp, equal the one-shot tiled kernel over all columns.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from m2megatron_kernels import tiled_ce_reference as reference

from m2megatron.config import ConfigError, LossConfig
from m2megatron.loss import contrastive_loss, ring_clip_cross_entropy, sent_bytes
from m2megatron.loss.traffic import gather_sent_bytes, ring_sent_bytes
from tests.unit.test_loss import grads_of, normalized

pytestmark = pytest.mark.unit


def max_rel(got, want):
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max()).item() for g, w in zip(got, want))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_folded_block_statistics_and_block_backward_equal_the_whole(smoothing):
    """What each ring step computes, over G = 3 blocks of m = 4 columns (positives in block `own`)."""
    m, blocks, own, d = 4, 3, 1, 6
    q, k = normalized(m, d), normalized(m * blocks, d, seed=1)
    scale, g = torch.tensor(13.0, dtype=torch.float64), torch.linspace(0.5, 1.5, m, dtype=torch.float64)
    n = m * blocks
    want_loss, row_max, log_sum = reference.ce_forward(q, k, scale, own * m, smoothing, tile=5)
    want_q, want_k, want_s = reference.ce_backward(q, k, scale, own * m, smoothing, row_max, log_sum, g, tile=5)

    offsets = [0 if b == own else m for b in range(blocks)]  # block-relative: m = "no positive in this block"
    stats = None
    for b in range(blocks):
        block = reference.ce_forward_stats(q, k[b * m:(b + 1) * m], scale, offsets[b], tile=3)
        stats = block if stats is None else reference.fold_stats(stats, block)
    loss, ring_max, ring_log_sum = reference.loss_from_stats(*stats, n, smoothing)
    got_q, got_k, got_s = 0, [], 0
    for b in range(blocks):  # rows' and columns' gradients in separate calls, as the ring's backward does
        block, state = k[b * m:(b + 1) * m], (smoothing, ring_max, ring_log_sum, g)
        grad_q, no_k, grad_s = reference.ce_backward(q, block, scale, offsets[b], *state, tile=3, total_columns=n,
                                                     col_grads=False)
        no_q, grad_k, no_s = reference.ce_backward(q, block, scale, offsets[b], *state, tile=3, total_columns=n,
                                                   row_grads=False)
        assert no_k is None and no_q is None and no_s is None
        got_q, got_s = got_q + grad_q, got_s + grad_s
        got_k.append(grad_k)
    got = [loss, got_q, torch.cat(got_k), got_s]
    assert max_rel(got, [want_loss, want_q, want_k, want_s]) < 1e-12


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("chunk_size,smoothing", [(None, 0.0), (3, 0.1), (1, 0.2)])
def test_ring_of_one_equals_the_gather_path(dtype, rel, chunk_size, smoothing):
    """G = 1 (group None): the ring degenerates to the rank's own block, no communication."""
    image, text = normalized(7, 5, dtype), normalized(7, 5, dtype, seed=1)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)

    def loss(exchange, chunk):
        config = LossConfig(exchange=exchange, chunk_size=chunk, label_smoothing=smoothing)
        return lambda i, t, s: contrastive_loss(i, t, s, group=None, config=config)

    want = grads_of(loss("gather", None), image, text, log_scale)
    got = grads_of(loss("ring", chunk_size), image, text, log_scale)
    # fp32: the log-scale gradient nearly cancels; compare it to its terms' size (s) rather than itself.
    assert max_rel(got[:3], want[:3]) < rel
    assert (got[3] - want[3]).abs().item() < rel * math.exp(log_scale.item())


def test_ring_upcasts_bf16_embeddings():
    image, text = normalized(6, 8, torch.bfloat16), normalized(6, 8, torch.bfloat16, seed=1)
    scale = torch.tensor(14.0)
    per_row = ring_clip_cross_entropy(image, text, scale, group=None, tile=4, kernel="torch")
    labels = torch.arange(6)
    want = torch.stack([F.cross_entropy(scale * image.float() @ text.float().T, labels, reduction="none"),
                        F.cross_entropy(scale * text.float() @ image.float().T, labels, reduction="none")])
    assert per_row.dtype == torch.float32
    torch.testing.assert_close(per_row, want, rtol=1e-6, atol=1e-6)
    image_grad, text_grad = grads_of(lambda i, t: ring_clip_cross_entropy(i, t, scale, group=None).sum(),
                                     image, text)[1:]
    assert image_grad.dtype == text_grad.dtype == torch.bfloat16


def test_ring_settings_are_validated_and_named():
    LossConfig(exchange="ring").validate()
    LossConfig(exchange="ring", kernel="triton").validate()  # the ring always tiles: no chunk_size needed
    with pytest.raises(ConfigError, match="loss.exchange"):
        LossConfig(exchange="all-to-all").validate()
    with pytest.raises(ConfigError, match="loss.kernel"):
        LossConfig(exchange="gather", kernel="triton").validate()
    with pytest.raises(ValueError, match="loss.exchange"):
        contrastive_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor(1.0), group=None,
                         config=LossConfig(exchange="all-to-all"))
    with pytest.raises(ValueError, match="same shape"):
        ring_clip_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor(1.0), group=None)


def test_byte_model_ratios():
    m, d = 64, 1024
    for exchange in ("gather", "ring"):
        global_, grouped = sent_bytes(exchange, 256, m, d, 2), sent_bytes(exchange, 16, m, d, 2)
        assert grouped / global_ == pytest.approx(15 / 255)
        assert sent_bytes(exchange, 1, m, d, 2) == 0
    # no gradient travels in the ring: gather's bytes plus 6 fp32 numbers of row state per row
    assert ring_sent_bytes(8, m, d, 4) - gather_sent_bytes(8, m, d, 4) == 7 * m * 6 * 4
    assert sent_bytes("ring", 8, m, d, 2) / sent_bytes("gather", 8, m, d, 2) == pytest.approx(1 + 24 / (4 * d * 2))
    with pytest.raises(ValueError, match="loss.exchange"):
        sent_bytes("broadcast", 8, m, d, 2)
