"""On a GPU: the compiled Triton kernel of the chunked loss vs its PyTorch reference (numbers, time, memory).

Run on a lent GPU: `pytest -q -s tests/gpu/test_loss_kernel.py` (skipped without CUDA). The timing
test prints a small table (docs/LOSS.md keeps the numbers of the last run).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.figures import figure

pytestmark = pytest.mark.gpu
triton_impl = pytest.importorskip("m2megatron_kernels.tiled_ce_triton") if torch.cuda.is_available() else None


def _inputs(m, n, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = F.normalize(torch.randn(m, d, device="cuda", generator=gen), dim=1).to(dtype)
    k = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).to(dtype)
    return q, k, torch.tensor(14.0, device="cuda"), torch.rand(m, device="cuda", generator=gen)


def _max_rel(got, want):
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max()).item() for g, w in zip(got, want))


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_compiled_kernel_equals_reference(dtype, rel):
    from m2megatron_kernels import tiled_ce_reference as reference

    q, k, scale, g = _inputs(300, 5000, 200, dtype)
    got = triton_impl.ce_forward(q, k, scale, 1000, 0.1)
    want = reference.ce_forward(q, k, scale, 1000, 0.1, tile=512)
    got_bwd = triton_impl.ce_backward(q, k, scale, 1000, 0.1, *got[1:], g)
    want_bwd = reference.ce_backward(q, k, scale, 1000, 0.1, *want[1:], g, tile=512)
    assert _max_rel(got[:1] + got_bwd, want[:1] + want_bwd) < rel


def _measure(fn, q, k, scale):
    """(ms per forward+backward, peak bytes above the inputs) of fn(q, k, scale).sum().backward()."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, scale)]
    fn(*leaves).sum().backward()  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 5, torch.cuda.max_memory_allocated() - base


def test_compiled_kernel_time_and_memory_against_dense_and_torch_tiles():
    from m2megatron.loss import tiled_clip_cross_entropy

    m, n, d = 1024, 65536, 1024  # A·b local rows against G·b·A columns, 10B embedding width
    q, k, scale, _ = _inputs(m, n, d, torch.bfloat16)
    pairs = torch.stack([k, k.flip(0)], dim=1)  # [n, 2, d]: gathered (image, text) columns, the fused layout
    labels = torch.arange(m, device="cuda")

    def dense(q, pairs, s):  # both directions, as the fused tiled function computes them
        return torch.stack([F.cross_entropy(s * q.float() @ pairs[:, col].float().T, labels, reduction="none")
                            for col in (1, 0)])

    variants = {
        "dense": dense,
        "torch tiles": lambda q, p, s: tiled_clip_cross_entropy(q, q, p, s, row_offset=0, tile=4096, kernel="torch"),
        "triton": lambda q, p, s: tiled_clip_cross_entropy(q, q, p, s, row_offset=0, tile=4096, kernel="triton"),
    }
    results = {name: _measure(fn, q, pairs, scale) for name, fn in variants.items()}
    for name, (ms, peak) in results.items():
        print(figure(f"loss kernel {name:12s} m={m} n={n} d={d} bf16: {ms:8.2f} ms  peak {peak / 2**20:9.1f} MiB"))
    assert results["triton"][1] * 4 < results["dense"][1]
