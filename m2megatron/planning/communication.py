"""Bytes each rank sends per optimizer step, by parallel axis and loss mode (ring-algorithm volumes).

A ring all-gather or reduce-scatter of a tensor whose per-rank chunk is c over a group of g sends
(g − 1)·c per rank; an all-reduce of a tensor of size x sends 2·(g − 1)/g·x. The loss terms are those
of docs/LOSS.md §5 (and tools/bench_loss.py's analytic model).
"""

from __future__ import annotations

from m2megatron.config.model import ModelConfig

FP32 = 4


def loss_sent_bytes(*, group: int, rows: int, embed_dim: int, elem: int) -> int:
    """One loss evaluation over `rows` local rows: all-gather of image+text rows, reduce-scatter of their grads."""
    return 4 * (group - 1) * rows * embed_dim * elem


def loss_peak_bytes(*, rows: int, cols: int, embed_dim: int, elem: int, chunk: int | None) -> int:
    """Peak loss memory per rank (docs/LOSS.md §5): logits terms plus gathered columns and their gradients."""
    if chunk is None:
        return 4 * rows * cols * FP32 + 2 * cols * embed_dim * (2 * elem + FP32)
    return 3 * rows * min(chunk, cols) * FP32 + 4 * cols * embed_dim * elem


def all_reduce_sent(nbytes: float, group: int) -> float:
    return 2 * (group - 1) / group * nbytes if group > 1 else 0.0


def gradient_sent_bytes(params: int, dp: int, *, distributed_optimizer: bool, param_elem: int) -> float:
    """Data-parallel gradient reduction per step (fp32 grads): all-reduce, or reduce-scatter + param all-gather."""
    if dp == 1:
        return 0.0
    if distributed_optimizer:
        return (dp - 1) / dp * params * (FP32 + param_elem)
    return all_reduce_sent(params * FP32, dp)


def tensor_parallel_sent_bytes(cfg: ModelConfig, *, tp: int, layers: int, tokens: int, elem: int) -> float:
    """Per microbatch and stage: 2 all-reduces of [tokens, D] per layer forward (out-proj, fc2) and 2 backward
    (QKV and fc1 input grads); the Sub-LN statistics all-reduces are 2 floats per token and negligible."""
    return 4 * layers * all_reduce_sent(tokens * cfg.hidden_size * elem, tp)


def pipeline_sent_bytes(cfg: ModelConfig, *, tokens: int, elem: int) -> float:
    """Per microbatch and stage boundary: the packed activation forward and its gradient backward."""
    return 2 * tokens * cfg.hidden_size * elem
