"""A TP-sharded LayerNorm case shared by the TP parity tests: random rows with their unsharded LayerNorm (output
and the gradients of input, weight and bias), and a TPLayerNorm run on one rank's slice of the columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5


def unsharded_case(width: int, rows: tuple[int, ...] = (5, 2), seed: int = 3):
    """((x, w, b, upstream gradient), [output, ∂x, ∂w, ∂b] of the unsharded LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, width, generator=gen) * 2 + 0.5
    w, b = 1 + torch.randn(width, generator=gen) * 0.1, torch.randn(width, generator=gen)
    up = torch.randn(*rows, width, generator=gen)
    full = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.layer_norm(full[0], (width,), full[1], full[2], EPS)
    (ref * up).sum().backward()
    return (x, w, b, up), [ref.detach()] + [t.grad for t in full]


def sharded_run(norm, inputs, columns: slice) -> list[torch.Tensor]:
    """[output, ∂x, ∂w, ∂b] of `norm` (a TPLayerNorm holding `columns`) on those columns of the case."""
    x, w, b, up = inputs
    with torch.no_grad():
        norm.weight.copy_(w[columns])
        norm.bias.copy_(b[columns])
    local_x = x[..., columns].clone().requires_grad_()
    out = norm(local_x)
    (out * up[..., columns]).sum().backward()
    return [out.detach(), local_x.grad, norm.weight.grad, norm.bias.grad]


def max_abs_diff(got, want) -> float:
    return max((g - r).abs().max().item() for g, r in zip(got, want))
