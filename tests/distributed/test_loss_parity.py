"""The contrastive loss on gloo ranks equals its single-process references, in loss and gradients.

- global (G = P) equals OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True), dense and chunked;
- grouped (G < P) equals a single-process mean of per-group OpenCLIP losses (under DDP averaging);
- with TP = 2 every TP rank computes the same loss over its own DP sub-group.
OpenCLIP gathers over the whole world, so its comparisons use a pool of exactly P ranks (world = group).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from m2megatron.config import LossConfig
from m2megatron.loss import contrastive_loss
from m2megatron.parallel import Layout, build_groups

pytestmark = pytest.mark.distributed

B, D = 3, 8  # rows per rank, embedding dim
INIT_LOG_SCALE = math.log(1 / 0.07)
# fp32: the bound. The logit-scale gradient is a small difference of O(1) sums, so fp32 paths
# that sum in another order (the chunked loss) agree only to ~1e-6–1e-5 there (OpenCLIP's own fp32
# value is 1.1e-6 off its fp64 value); fp64 shows that every path computes the same function.
REL_TOL = {torch.float32: 1e-6, torch.float64: 1e-11}


@functools.cache
def openclip_loss_module():
    """open_clip/loss.py loaded by file path.

    open-clip-torch is installed with --no-deps (requirements: Makefile) because its declared
    dependencies pull torchvision, which cannot run beside the CPU torch build; its package
    __init__ imports torchvision, so we load only loss.py, which needs nothing but torch.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (make test-venv installs it with --no-deps)")
    path = f"{spec.submodule_search_locations[0]}/loss.py"
    module_spec = importlib.util.spec_from_file_location("openclip_loss_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_batch(num_rows: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings [num_rows, D], identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(num_rows, D, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(num_rows, D, generator=gen, dtype=torch.float64), dim=1)
    return image.to(dtype), text.to(dtype)


def loss_and_grads(loss_fn, image, text, log_scale=INIT_LOG_SCALE):
    """loss_fn(image, text, log_scale) and its gradients wrt all three, as plain tensors."""
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = torch.tensor(log_scale, dtype=image.dtype, requires_grad=True)
    loss = loss_fn(image, text, scale)
    loss.backward()
    return {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def max_rel_err(got: dict, want: dict) -> float:
    return max(rel_err(got[k], want[k]) for k in want)


def _rank_slice(tensor, rank, rows=B):
    return tensor[rank * rows:(rank + 1) * rows]


# --- global mode vs OpenCLIP -----------------------------------------------------------------------


def _global_vs_openclip(chunk_size, dtype):
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = build_groups(Layout(world_size=world))
    image, text = make_batch(world * B, dtype)
    image, text = _rank_slice(image, rank), _rank_slice(text, rank)
    clip = openclip_loss_module().ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    want = loss_and_grads(lambda i, t, s: clip(i, t, s.exp()), image, text)
    config = LossConfig(chunk_size=chunk_size)
    got = loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, group=groups.loss, config=config), image, text)
    return max_rel_err(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_rank_equals_openclip(dtype):
    """P = 1: no group, no communication; dense and chunked (fp64: chunked is the same function)."""
    image, text = make_batch(5, dtype)
    clip = openclip_loss_module().ClipLoss()
    want = loss_and_grads(lambda i, t, s: clip(i, t, s.exp()), image, text)
    for chunk_size in (None, 2) if dtype == torch.float64 else (None,):
        config = LossConfig(chunk_size=chunk_size)
        got = loss_and_grads(lambda i, t, s, c=config: contrastive_loss(i, t, s, group=None, config=c), image, text)
        assert max_rel_err(got, want) < REL_TOL[dtype], chunk_size


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("chunk_size,dtype", [(None, torch.float32), (5, torch.float64)])
def test_global_mode_equals_openclip(dist_pool, world, chunk_size, dtype):
    errors = dist_pool(world).run(_global_vs_openclip, chunk_size, dtype)
    assert max(errors) < REL_TOL[dtype], errors


# --- grouped mode vs the single-process mean of per-group losses -------------------------------


def _grouped_rank(group_size, tensor_parallel, chunk_size):
    world = dist.get_world_size()
    groups = build_groups(Layout(world_size=world, tensor_parallel=tensor_parallel, loss_group_size=group_size))
    image, text = make_batch(groups.layout.data_parallel * B)
    image, text = _rank_slice(image, groups.dp_rank), _rank_slice(text, groups.dp_rank)
    config = LossConfig(chunk_size=chunk_size)
    got = loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, group=groups.loss, config=config), image, text)
    return groups.tp_rank, groups.dp_rank, got


def _single_process_grouped_reference(data_parallel, group_size):
    """Loss and gradients of the mean over groups of OpenCLIP's single-process loss on each group's G·B rows."""
    clip = openclip_loss_module().ClipLoss()
    rows = group_size * B

    def mean_of_group_losses(image, text, scale):
        losses = [clip(i, t, scale.exp()) for i, t in zip(image.split(rows), text.split(rows))]
        return torch.stack(losses).mean()

    return loss_and_grads(mean_of_group_losses, *make_batch(data_parallel * B))


@pytest.mark.parametrize("world,group_size,tensor_parallel,chunk_size", [
    (4, 2, 1, None), (4, 2, 1, 4), (4, 1, 1, None), (4, 2, 2, None), (8, 4, 1, 4), (8, 2, 2, 5),
])
def test_grouped_mode_equals_mean_of_group_losses(dist_pool, world, group_size, tensor_parallel, chunk_size):
    results = dist_pool(world).run(_grouped_rank, group_size, tensor_parallel, chunk_size)
    data_parallel = world // tensor_parallel
    want = _single_process_grouped_reference(data_parallel, group_size)
    for tp_rank in range(tensor_parallel):
        per_dp = sorted((dp, got) for tp, dp, got in results if tp == tp_rank)
        # DDP averages over the P data-parallel ranks: loss and scale grad are means of the per-rank
        # values; each rank's embedding grad (the group's sum) divided by P is the reference's.
        got = {"loss": torch.stack([g["loss"] for _, g in per_dp]).mean(),
               "scale": torch.stack([g["scale"] for _, g in per_dp]).mean(),
               "image": torch.cat([g["image"] for _, g in per_dp]) / data_parallel,
               "text": torch.cat([g["text"] for _, g in per_dp]) / data_parallel}
        assert max_rel_err(got, want) < REL_TOL[torch.float32], (tp_rank, {k: rel_err(got[k], want[k]) for k in want})
