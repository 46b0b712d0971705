"""Bytes each rank sends per loss step (forward + backward), by exchange: the analytic model of docs/LOSS.md §5.

A collective is counted as what each rank must send whatever its algorithm: (G − 1) × its chunk for an
all-gather or a reduce-scatter. m = A·b local rows, d the embedding width, e bytes per embedding element,
g bytes per element of the ring's gradient accumulators (the loss's compute dtype: 4, or 8 for fp64).

    gather:  2·(G−1)·m·d·e  (all-gather of image+text)  +  2·(G−1)·m·d·e  (reduce-scatter of their gradients)
    ring:    2·(G−1)·m·d·e  (forward blocks)  +  2·(G−1)·m·d·e  (backward blocks)  +  2·(G−1)·m·d·g  (accumulators)

Both are proportional to G − 1, so grouped / global = (G − 1)/(P − 1) for either; ring / gather is
(2e + g)/(2e): 1.5 for fp32 embeddings, 2 for bf16 (the blocks are sent twice because backward recomputes
instead of holding them, and the accumulators are fp32 where the gather's reduce-scatter sums in e).
"""

from __future__ import annotations

FP32 = 4


def gather_sent_bytes(group_size: int, rows: int, dim: int, elem_bytes: int) -> int:
    return 4 * (group_size - 1) * rows * dim * elem_bytes


def ring_sent_bytes(group_size: int, rows: int, dim: int, elem_bytes: int, grad_bytes: int = FP32) -> int:
    return 2 * (group_size - 1) * rows * dim * (2 * elem_bytes + grad_bytes)


def sent_bytes(exchange: str, group_size: int, rows: int, dim: int, elem_bytes: int) -> int:
    """Bytes one rank sends in one forward + backward of the loss (LossConfig.exchange = `exchange`)."""
    if exchange == "ring":
        return ring_sent_bytes(group_size, rows, dim, elem_bytes, grad_bytes=max(FP32, elem_bytes))
    if exchange == "gather":
        return gather_sent_bytes(group_size, rows, dim, elem_bytes)
    raise ValueError(f"loss.exchange: {exchange!r} is not one of ['gather', 'ring']")
