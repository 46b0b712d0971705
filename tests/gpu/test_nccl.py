"""NCCL sanity on one GPU: our process-group set-up with the nccl backend, and the collectives we use."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def groups():
    import torch.distributed as dist

    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize

    if dist.is_initialized():  # another gpu test module made a (gloo or nccl) world of one
        pytest.skip("a process group already exists in this pytest process; run this file on its own")
    os.environ.setdefault("MASTER_PORT", "29531")
    groups = initialize(ParallelConfig(backend="nccl"))
    assert dist.get_backend() == "nccl"
    return groups


def test_collectives_on_cuda_tensors(groups):
    import torch.distributed as dist

    x = torch.arange(8, dtype=torch.float32, device="cuda")
    dist.all_reduce(x, group=groups.dp)
    out = torch.empty(8, device="cuda")
    dist.all_gather_into_tensor(out, x, group=groups.tp)
    dist.reduce_scatter_tensor(x, out, group=groups.loss)
    dist.broadcast(x, src=0)
    torch.cuda.synchronize()
    assert torch.equal(x.cpu(), torch.arange(8, dtype=torch.float32))


def test_loss_gather_with_gradient_over_the_loss_group(groups):
    from m2megatron.config import LossConfig
    from m2megatron.loss import contrastive_loss

    image = torch.nn.functional.normalize(torch.randn(4, 16, device="cuda"), dim=1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(4, 16, device="cuda"), dim=1).requires_grad_()
    scale = torch.tensor(2.0, device="cuda", requires_grad=True)
    loss = contrastive_loss(image, text, scale, group=groups.loss, config=LossConfig())
    loss.backward()
    assert torch.isfinite(loss) and image.grad is not None and torch.isfinite(image.grad).all()
