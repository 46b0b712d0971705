"""On one GPU: the ring exchange of the contrastive loss (LossConfig.exchange="ring") with the compiled Triton kernel.

Run on a lent GPU: `pytest -q -s tests/gpu/test_loss_ring.py` (skipped without CUDA).

What one GPU can show:
- the compiled Triton kernel does what a ring step asks of it: statistics of a column block without
  the rows' positives, folded online over G = 4 blocks, and each block's backward against the global
  log-sum-exp with ε/n over all columns, rows' and columns' gradients in separate launches
  (row_grads / col_grads), equal the kernel over all columns at once and the torch reference
  (in-process, no process group);
- in a world of one NCCL rank (a child process, so that its process group leaves this pytest process
  alone) the ring over the real loss group (G = 1: the rank's own block, no hop) equals the gather path
  in loss and gradients, fp32 and bf16 embeddings, Triton (auto) and torch kernels; every output is a
  CUDA tensor of the input's dtype; time and peak memory of ring against gather are printed.
What it cannot show (a world of one has no peers, and NCCL refuses two ranks on one GPU): the NCCL p2p
hops (batch_isend_irecv around a ring, G = 2 with prev == next), their overlap with the tile work, and
peak memory flat in G. Those are covered on gloo by tests/distributed/test_loss_ring.py and
tools/bench_loss.py, and need a multi-GPU node to be seen on NCCL.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
triton_impl = pytest.importorskip("m2megatron_kernels.tiled_ce_triton") if torch.cuda.is_available() else None


def _max_rel(got, want):
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max()).item() for g, w in zip(got, want))


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_kernel_on_ring_blocks_equals_the_whole_and_the_reference(dtype, rel):
    from m2megatron_kernels import tiled_ce_reference as reference

    m, blocks, own, d, smoothing = 1000, 4, 2, 320, 0.1
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(m, d, device="cuda", generator=gen), dim=1).to(dtype)
    k = F.normalize(torch.randn(m * blocks, d, device="cuda", generator=gen), dim=1).to(dtype)
    scale, g = torch.tensor(14.0, device="cuda"), torch.rand(m, device="cuda", generator=gen)
    whole_loss, row_max, log_sum = triton_impl.ce_forward(q, k, scale, own * m, smoothing)
    whole_bwd = triton_impl.ce_backward(q, k, scale, own * m, smoothing, row_max, log_sum, g)
    results = {}
    for name, impl, tile in (("triton", triton_impl, None), ("torch", reference, 512)):
        offsets = [0 if b == own else m for b in range(blocks)]  # m: no positive in the block
        stats = None
        for b in range(blocks):
            block = impl.ce_forward_stats(q, k[b * m:(b + 1) * m], scale, offsets[b], tile)
            stats = block if stats is None else reference.fold_stats(stats, block)
        loss, ring_max, ring_log_sum = reference.loss_from_stats(*stats, m * blocks, smoothing)
        state = (smoothing, ring_max, ring_log_sum, g)
        rows = [impl.ce_backward(q, k[b * m:(b + 1) * m], scale, offsets[b], *state, tile, total_columns=m * blocks,
                                 col_grads=False) for b in range(blocks)]  # as the ring: rows' gradients only
        cols = [impl.ce_backward(q, k[b * m:(b + 1) * m], scale, offsets[b], *state, tile, total_columns=m * blocks,
                                 row_grads=False)[1] for b in range(blocks)]  # and the columns' only
        grad_q = sum(r[0].float() for r in rows)
        grad_k = torch.cat(cols)
        grad_s = sum(r[2] for r in rows)
        results[name] = [loss, grad_q, grad_k, grad_s]
    want = [whole_loss, whole_bwd[0].float(), whole_bwd[1], whole_bwd[2]]
    assert _max_rel(results["triton"], want) < rel, _max_rel(results["triton"], want)
    assert _max_rel(results["triton"], results["torch"]) < rel, _max_rel(results["triton"], results["torch"])


def test_ring_equals_gather_in_a_one_rank_nccl_world():
    from m2megatron.parallel.launch_env import free_port
    from tests.gpu.figures import figure

    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["MASTER_PORT"] = str(port)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for line in report["timing"]:
        print(figure(f"loss ring {line}"))
    assert report["on_device"], report
    for case, errors in report["errors"].items():
        tol = 1e-5 if "float32" in case else 1e-2  # bf16: gradients come back rounded to bf16
        assert max(errors.values()) < tol, (case, errors)


# --- the child process: one NCCL rank --------------------------------------------------------------


def _loss_and_grads(image, text, log_scale, group, config):
    from m2megatron.loss import contrastive_loss

    leaves = [x.detach().clone().requires_grad_() for x in (image, text, log_scale)]
    loss = contrastive_loss(*leaves, group=group, config=config)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _errors(got, want, scale):
    """Relative errors of loss and embedding gradients; the log-scale gradient's absolute error / s."""
    names = ("loss", "image", "text")
    errors = {name: _max_rel([g], [w]) for name, g, w in zip(names, got, want)}
    errors["scale"] = (got[3].double() - want[3].double()).abs().item() / scale
    return errors


def _parity(groups) -> tuple[dict, bool]:
    from m2megatron.config import LossConfig

    errors, on_device = {}, True
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device="cuda").manual_seed(1)
        image = F.normalize(torch.randn(3000, 256, device="cuda", generator=gen), dim=1).to(dtype)
        text = F.normalize(image.float() + 0.5 * torch.randn(3000, 256, device="cuda", generator=gen), dim=1).to(dtype)
        log_scale = torch.tensor(math.log(1 / 0.07), device="cuda")
        want = _loss_and_grads(image, text, log_scale, groups.loss, LossConfig(label_smoothing=0.1))
        for kernel, chunk in (("auto", None), ("auto", 1024), ("torch", 1024)):
            config = LossConfig(exchange="ring", kernel=kernel, chunk_size=chunk, label_smoothing=0.1)
            got = _loss_and_grads(image, text, log_scale, groups.loss, config)
            on_device &= all(t.device.type == "cuda" for t in got)
            on_device &= got[1].dtype == got[2].dtype == dtype
            errors[f"{dtype} ring kernel={kernel} chunk={chunk}"] = _errors(got, want, math.exp(log_scale.item()))
    return errors, on_device


def _timing(groups) -> list[str]:
    """ms per forward + backward and peak bytes above the inputs, ring vs gather (bf16, m = 8192, d = 1024)."""
    from m2megatron.config import LossConfig
    from m2megatron.loss import contrastive_loss

    m, d = 8192, 1024
    image = F.normalize(torch.randn(m, d, device="cuda"), dim=1).to(torch.bfloat16)
    text = F.normalize(torch.randn(m, d, device="cuda"), dim=1).to(torch.bfloat16)
    log_scale = torch.tensor(math.log(1 / 0.07), device="cuda")
    variants = {"gather dense": LossConfig(), "gather chunked": LossConfig(chunk_size=4096),
                "ring": LossConfig(exchange="ring")}
    lines = []
    for name, config in variants.items():
        leaves = [x.clone().requires_grad_() for x in (image, text, log_scale)]
        contrastive_loss(*leaves, group=groups.loss, config=config).backward()  # warm-up / compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            contrastive_loss(*leaves, group=groups.loss, config=config).backward()
        end.record()
        torch.cuda.synchronize()
        ms, peak = start.elapsed_time(end) / 3, torch.cuda.max_memory_allocated() - base
        lines.append(f"{name:14s} G=1 m={m} d={d} bf16: {ms:8.2f} ms  peak {peak / 2**20:9.1f} MiB")
    return lines


def main() -> None:
    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, shutdown

    groups = initialize(ParallelConfig(backend="nccl"))
    try:
        errors, on_device = _parity(groups)
        report = {"errors": errors, "on_device": on_device, "timing": _timing(groups)}
    finally:
        shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
