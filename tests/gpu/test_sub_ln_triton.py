"""On a GPU: the TP Sub-LN's compiled Triton kernels (what model.sub_ln_kernel='auto' picks on CUDA) equal the eager
version, output and gradients, in fp32 and bf16 (the passes alone: a group of one rank skips the all-reduce;
tests/distributed/test_sub_ln_triton.py checks TP2 in the interpreter). tools/bench_subln.py times them."""

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def group():
    from m2megatron.parallel import initialize
    from m2megatron.parallel.launch_env import shape_world_env

    initialize(env=shape_world_env(), megatron_state=False)  # keeps a world another gpu test module made
    return dist.group.WORLD


def _run(kernel, x, w, b, grad_y, group):
    from m2megatron.models.sub_ln import tp_layer_norm

    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = tp_layer_norm(*leaves, x.shape[-1], 1e-5, group, kernel=kernel)
    y.backward(grad_y)
    return [y.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_kernels_equal_eager(group, dtype, rel):
    from m2megatron.models.sub_ln import use_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    x, grad_y = (torch.randn(197 * 3, 1000, device="cuda", generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(1000, device="cuda", generator=gen)).to(dtype)
    b = torch.randn(1000, device="cuda", generator=gen).to(dtype)
    assert use_triton("auto", x)
    got, want = _run("triton", x, w, b, grad_y, group), _run("eager", x, w, b, grad_y, group)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        assert ((g.float() - r.float()).abs().max() / r.float().abs().max()).item() <= rel
