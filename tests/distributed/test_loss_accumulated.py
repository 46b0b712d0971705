"""Batch accumulation: A microbatches through the two-pass (GradCache) path equal one microbatch of A·b.

A tiny two-tower "model" (one linear map per modality, then L2 normalisation) stands in for the
encoder, so the test checks the whole trainer-facing contract: forward-only pass → cached
embedding gradients → per-microbatch surrogate backward, against a direct backward of one big batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from m2megatron.config import LossConfig
from m2megatron.loss import accumulated_loss_and_grads, contrastive_loss, surrogate_loss
from m2megatron.parallel import Layout, build_groups

pytestmark = pytest.mark.distributed

B, D_IN, D = 2, 6, 5
REL_TOL = 1e-6


class TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.image = torch.nn.Parameter(torch.randn(D_IN, D, generator=gen))
        self.text = torch.nn.Parameter(torch.randn(D_IN, D, generator=gen))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_image, x_text):
        return F.normalize(x_image @ self.image, dim=1), F.normalize(x_text @ self.text, dim=1)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def accumulated_vs_one_big_microbatch(group, rank_seed, num_microbatches, config):
    """Max relative error of loss and parameter gradients (two-pass vs direct)."""
    gen = torch.Generator().manual_seed(100 + rank_seed)
    x_image, x_text = torch.randn(2, num_microbatches * B, D_IN, generator=gen)

    model = TwoTowers()
    loss = contrastive_loss(*model(x_image, x_text), model.logit_scale, group=group, config=config)
    loss.backward()
    want = _grads(model)

    model = TwoTowers()
    micro = list(zip(x_image.split(B), x_text.split(B)))
    with torch.no_grad():  # pass 1: forward only
        embs = [model(xi, xt) for xi, xt in micro]
    cached = accumulated_loss_and_grads([e[0] for e in embs], [e[1] for e in embs], model.logit_scale,
                                        group=group, config=config)
    values = []
    for index, (xi, xt) in enumerate(micro):  # pass 3: recompute + surrogate backward
        surrogate = surrogate_loss(*model(xi, xt), cached, index, logit_scale=model.logit_scale)
        surrogate.backward()
        values.append(surrogate.detach())
    got = _grads(model)
    errors = [_rel(got[name], want[name]) for name in want]
    errors += [abs(cached.loss - loss).item() / loss.item(), abs(sum(values) - loss).item() / loss.item()]
    return max(errors)


def _accumulated_rank(group_size, num_microbatches, chunk_size):
    groups = build_groups(Layout(world_size=dist.get_world_size(), loss_group_size=group_size))
    return accumulated_vs_one_big_microbatch(groups.loss, groups.dp_rank, num_microbatches,
                                             LossConfig(chunk_size=chunk_size, label_smoothing=0.1))


def test_accumulated_single_process_equals_one_big_microbatch():
    assert accumulated_vs_one_big_microbatch(None, 0, 3, LossConfig()) < REL_TOL
    assert accumulated_vs_one_big_microbatch(None, 0, 2, LossConfig(chunk_size=3)) < REL_TOL


@pytest.mark.parametrize("world,group_size,num_microbatches,chunk_size", [
    (4, 2, 3, None), (4, 4, 2, 3), (8, 4, 2, None),
])
def test_accumulated_equals_one_big_microbatch(dist_pool, world, group_size, num_microbatches, chunk_size):
    errors = dist_pool(world).run(_accumulated_rank, group_size, num_microbatches, chunk_size)
    assert max(errors) < REL_TOL, errors


def test_surrogate_rejects_mismatched_microbatch():
    cached = accumulated_loss_and_grads([torch.randn(2, D)], [torch.randn(2, D)], torch.tensor(1.0), group=None)
    with pytest.raises(ValueError, match="microbatch 0"):
        surrogate_loss(torch.randn(3, D), torch.randn(3, D), cached, 0)
