"""The Triton kernel of the chunked loss, run by Triton's CPU interpreter, equals its PyTorch reference.

TRITON_INTERPRET=1 must be set before the kernels are defined and would leak into every other test
of the session, so the checks run in a child process: this file executed as a script.
Sizes are tiny and not multiples of the 16-wide blocks, to exercise every mask (the interpreter is slow).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.harness import run_under_triton_interpreter

pytestmark = pytest.mark.unit

CASES = [  # (m, n, d, row_offset, label_smoothing, column split width)
    (20, 37, 24, 10, 0.0, None),
    (5, 70, 33, 65, 0.1, 16),
]


def _max_rel(got, want) -> float:
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want))


def _kernel_vs_reference(dtype_name: str) -> dict[str, float]:
    """Max relative errors over CASES: "exact" for fp32 outputs, "rounded" for outputs in the input dtype.

    ∂L/∂k goes into an fp32 buffer, so for bf16 inputs only ∂L/∂q is rounded to bf16 (where two
    fp32 values 1e-7 apart may round one bf16 ulp, 2⁻⁸, apart).
    """
    import torch
    import torch.nn.functional as F
    from m2megatron_kernels import tiled_ce_reference as reference
    from m2megatron_kernels import tiled_ce_triton as triton_impl

    dtype = getattr(torch, dtype_name)
    exact, rounded = [], []
    for m, n, d, offset, smoothing, tile in CASES:
        gen = torch.Generator().manual_seed(m)
        q = F.normalize(torch.randn(m, d, generator=gen), dim=1).to(dtype)
        k = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)
        scale, g = torch.tensor(14.0), torch.rand(m, generator=gen)
        got = triton_impl.ce_forward(q, k, scale, offset, smoothing, tile)
        want = reference.ce_forward(q, k, scale, offset, smoothing, tile=7)
        got_q, got_k, got_s = triton_impl.ce_backward(q, k, scale, offset, smoothing, *got[1:], g, tile,
                                                      grad_k_out=torch.empty(n, d))
        want_q, want_k, want_s = reference.ce_backward(q, k, scale, offset, smoothing, *want[1:], g, tile=7,
                                                       grad_k_out=torch.empty(n, d))
        exact.append(_max_rel([got[0], got_k, got_s], [want[0], want_k, want_s]))
        (exact if dtype == torch.float32 else rounded).append(_max_rel([got_q], [want_q]))
    return {"exact": max(exact), "rounded": max(rounded, default=0.0)}


def _ring_block_kernel_vs_reference() -> float:
    """What a ring step asks of the kernel: statistics of one column block (with and without the rows'
    positives in it) and its backward against the global log-sum-exp with ε/n over all n columns, also
    with only the rows' (row_grads) or only the columns' (col_grads) gradients."""
    import torch
    import torch.nn.functional as F
    from m2megatron_kernels import tiled_ce_reference as reference
    from m2megatron_kernels import tiled_ce_triton as triton_impl

    m, d, total = 19, 24, 57  # a block of m columns out of 3·m
    gen = torch.Generator().manual_seed(3)
    q, k = (F.normalize(torch.randn(m, d, generator=gen), dim=1) for _ in range(2))
    scale, g = torch.tensor(14.0), torch.rand(m, generator=gen)
    errors = []
    for offset in (0, m):  # own block; a block without positives
        got = triton_impl.ce_forward_stats(q, k, scale, offset, 16)
        want = reference.ce_forward_stats(q, k, scale, offset, tile=7)
        errors.append(_max_rel([got[0], got[1], got[3]], [want[0], want[1], want[3]]))
        errors.append((got[2] - want[2]).abs().max().item())  # z_pos: 0 for the block without positives
        row_max, log_sum = want[0] + 0.5, torch.log(want[1]) + 1.0  # as if other blocks had raised the lse
        got_bwd = triton_impl.ce_backward(q, k, scale, offset, 0.1, row_max, log_sum, g, 16,
                                          grad_k_out=torch.empty(m, d), total_columns=total)
        want_bwd = reference.ce_backward(q, k, scale, offset, 0.1, row_max, log_sum, g, tile=7,
                                         grad_k_out=torch.empty(m, d), total_columns=total)
        errors.append(_max_rel(got_bwd, want_bwd))
        rows_only = triton_impl.ce_backward(q, k, scale, offset, 0.1, row_max, log_sum, g, 16, total_columns=total,
                                            col_grads=False)
        cols_only = triton_impl.ce_backward(q, k, scale, offset, 0.1, row_max, log_sum, g, 16, total_columns=total,
                                            grad_k_out=torch.empty(m, d), row_grads=False)
        assert rows_only[1] is None and cols_only[0] is None and cols_only[2] is None
        errors.append(_max_rel([rows_only[0], cols_only[1], rows_only[2]], want_bwd))
    return max(errors)


def _loss_through_triton_equals_torch() -> float:
    import torch
    import torch.nn.functional as F

    from m2megatron.config import LossConfig
    from m2megatron.loss import contrastive_loss

    gen = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(18, 20, generator=gen), dim=1) for _ in range(2))
    errors = []
    for exchange in ("gather", "ring"):  # the ring of one rank (G = 1): its own block through the kernel
        results = []
        for kernel in ("triton", "torch"):
            leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                      torch.tensor(2.6, requires_grad=True)]
            config = LossConfig(chunk_size=8, kernel=kernel, label_smoothing=0.1, exchange=exchange)
            loss = contrastive_loss(*leaves, group=None, config=config)
            loss.backward()
            results.append([loss.detach()] + [leaf.grad for leaf in leaves])
        errors.append(_max_rel(*results))
    return max(errors)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    report = {"fp32": _kernel_vs_reference("float32"), "bf16": _kernel_vs_reference("bfloat16"),
              "ring_block": _ring_block_kernel_vs_reference(), "loss": _loss_through_triton_equals_torch()}
    print(json.dumps(report))


@pytest.fixture(scope="module")
def interpreted_report():
    pytest.importorskip("triton")
    return run_under_triton_interpreter(__file__, timeout=600)


def test_interpreted_kernel_equals_reference_fp32(interpreted_report):
    assert interpreted_report["fp32"]["exact"] < 2e-6, interpreted_report


def test_interpreted_kernel_upcasts_bf16_inputs(interpreted_report):
    """bf16 inputs, fp32 inside: the reference's numbers on the same bf16 inputs (bf16 outputs: one ulp)."""
    assert interpreted_report["bf16"]["exact"] < 2e-6, interpreted_report
    assert interpreted_report["bf16"]["rounded"] <= 2**-8, interpreted_report


def test_interpreted_kernel_on_a_ring_block_equals_reference(interpreted_report):
    assert interpreted_report["ring_block"] < 2e-6, interpreted_report


def test_loss_with_triton_kernel_equals_torch_kernel(interpreted_report):
    assert interpreted_report["loss"] < 2e-6, interpreted_report


if __name__ == "__main__":
    main()
