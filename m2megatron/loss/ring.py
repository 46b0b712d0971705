"""The contrastive cross-entropy by a ring exchange of column blocks (Inf-CL): no rank holds the group's columns.

Rank r of a loss group of G ranks keeps its m local rows (image I_r, text T_r [m, d]); its columns are
the G blocks (I_o, T_o) of the group's ranks o, rank-major as in the gather path, so local row i's
positive is column i of its own block. The blocks travel around the ring (to group index r + 1,
from r − 1): at step s rank r holds the block of o = r − s and posts the hop that brings the next one
before it computes on the one in hand, so each transfer overlaps a block's tile work. G − 1 hops.

Forward: per block and direction the tiled kernel returns (row max, Σ exp(z − max), positive logit,
Σ z) for that block; they fold online (`fold_stats`: rescale to the running max), and the per-row
loss follows from the folded statistics exactly as in the one-shot kernel. Only [m] vectors are kept.

Backward: the blocks travel the ring again, each with its owner's row state (per row: max, log-sum
and upstream gradient of both directions, [6, m]). A rank's rows are also its column block, so rank r
holding block o recomputes two tiles per direction: its rows against o's columns, giving
∂L_r/∂(its rows) and ∂L_r/∂s, and o's rows against its own columns, giving ∂L_o/∂(its columns) with
o's row state. Summed over the G blocks, each rank gets Σ_{r' ∈ group} ∂L_{r'}/∂(its embeddings) (the
gather path's semantics, contrastive.py) and ∂L_r/∂s without any gradient leaving the rank: backward
sends what forward sends plus O(m) row state. The kernels' row_grads / col_grads switches keep the
work at one backward per tile pair on Triton (the rows kernel for the first tile, the columns kernel
for the second); the torch kernel recomputes each logits tile twice.

Memory per rank: two blocks in flight in the embedding dtype, the fp32 result [2, m, d], an [m, d]
column buffer, one kernel tile — O(m·d + m·tile), independent of G (docs/LOSS.md §5). Bytes: traffic.py.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from m2megatron_kernels import tiled_ce_reference
from m2megatron_kernels.tiled_ce_reference import compute_dtype, fold_stats, loss_from_stats
from torch import Tensor

from m2megatron.loss.ring_p2p import BLOCK_TAG, RingPeers, start_hop
from m2megatron.loss.tiled_ce import resolve_kernel


def _positive_offset(step: int, rows: int) -> int:
    """row_offset of the kernels for the block in hand: 0 in this rank's own block (step 0); elsewhere
    `rows`, which puts every positive past the block's columns, i.e. none in it."""
    return 0 if step == 0 else rows


class _BlockRing:
    """Blocks travelling the ring (image, text rows of a rank; in backward also its row state): the one in
    hand and the next one arriving."""

    def __init__(self, peers: RingPeers, *block: Tensor):
        self.peers, self.block, self._spare, self._hop = peers, block, None, None

    def prefetch(self, step: int) -> None:
        """Post the hop that sends the block in hand on and receives the block of step + 1 (none after the last)."""
        if step < self.peers.size - 1:
            incoming = self._spare or tuple(torch.empty_like(t) for t in self.block)
            self._hop = start_hop(self.peers, self.block, incoming, BLOCK_TAG)

    def advance(self, step: int) -> None:
        """Wait for the prefetched block and make it the one in hand (the sent one becomes the spare buffer)."""
        if self._hop is None:
            return
        received = self._hop.wait()
        self._spare = self.block if step > 0 else None  # never receive into the caller's embeddings
        self.block, self._hop = received, None


def _ring_forward(image: Tensor, text: Tensor, scale: Tensor, peers: RingPeers, tile: int | None,
                  impl: ModuleType) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Folded statistics (max, sum, z_pos, z_sum) [m] of the i2t and t2i rows over all G blocks."""
    ring = _BlockRing(peers, image, text)
    i2t = t2i = None
    for step in range(peers.size):
        ring.prefetch(step)
        image_cols, text_cols = ring.block
        offset = _positive_offset(step, image.shape[0])
        block_i2t = impl.ce_forward_stats(image, text_cols, scale, offset, tile)
        block_t2i = impl.ce_forward_stats(text, image_cols, scale, offset, tile)
        i2t = block_i2t if i2t is None else fold_stats(i2t, block_i2t)
        t2i = block_t2i if t2i is None else fold_stats(t2i, block_t2i)
        ring.advance(step)
    return i2t, t2i


def _direction_backward(step: int, mine: tuple[Tensor, Tensor, Tensor], theirs: tuple[Tensor, Tensor, Tensor],
                        scale: Tensor, home_rows: Tensor, home_cols: Tensor, spare: Tensor, args: tuple) -> Tensor:
    """One direction against the block in hand; adds to home_rows / home_cols, returns ∂L_r/∂s of it.

    mine / theirs: (rows, columns, row state [3, m] = max, log-sum, upstream gradient) of this rank and of
    the block's owner o. As rows: ∂L_r/∂(my rows) against o's columns. As columns: ∂L_o/∂(my columns)
    from o's rows and row state. At step 0 (o = r) one call gives both.
    """
    peers, smoothing, tile, impl = args
    (rows, cols, state), (their_rows, their_cols, their_state) = mine, theirs
    offset, total, own = _positive_offset(step, rows.shape[0]), peers.size * rows.shape[0], step == 0
    grad_rows, _, grad_scale = impl.ce_backward(rows, their_cols, scale, offset, smoothing, *state, tile,
                                                grad_k_out=spare, total_columns=total, col_grads=own)
    if not own:
        impl.ce_backward(their_rows, cols, scale, offset, smoothing, *their_state, tile, grad_k_out=spare,
                         total_columns=total, row_grads=False)
    home_rows += grad_rows
    home_cols += spare
    return grad_scale


class _RingClipCrossEntropy(torch.autograd.Function):
    """Per-row losses [2, m] (i2t, t2i) of this rank's rows against the ring's G·m columns."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, peers: RingPeers, smoothing: float,
                tile: int | None, impl: ModuleType) -> Tensor:
        i2t, t2i = _ring_forward(image, text, scale, peers, tile, impl)
        total = peers.size * image.shape[0]
        i2t_loss, i2t_max, i2t_log_sum = loss_from_stats(*i2t, total, smoothing)
        t2i_loss, t2i_max, t2i_log_sum = loss_from_stats(*t2i, total, smoothing)
        ctx.save_for_backward(image, text, scale, i2t_max, i2t_log_sum, t2i_max, t2i_log_sum)
        ctx.args = (peers, smoothing, tile, impl)
        return torch.stack([i2t_loss, t2i_loss])  # [2, m]

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        image, text, scale, i2t_max, i2t_log_sum, t2i_max, t2i_log_sum = ctx.saved_tensors
        # [6, m]: per row (max, log-sum, upstream gradient) of i2t, then of t2i; it travels with the block.
        state = torch.stack([i2t_max, i2t_log_sum, grad_loss[0], t2i_max, t2i_log_sum, grad_loss[1]])
        home = torch.zeros((2, *image.shape), dtype=compute_dtype(image), device=image.device)  # ∂/∂(image, text)
        spare = torch.empty_like(home[0])  # [m, d] column gradients of one call
        blocks = _BlockRing(ctx.args[0], image, text, state)
        grad_scale = torch.zeros((), dtype=scale.dtype, device=scale.device)
        for step in range(blocks.peers.size):
            blocks.prefetch(step)
            image_o, text_o, state_o = blocks.block  # of the owner o of the block in hand
            i2t = (image, text, state[:3]), (image_o, text_o, state_o[:3])
            t2i = (text, image, state[3:]), (text_o, image_o, state_o[3:])
            grad_scale += _direction_backward(step, *i2t, scale, home[0], home[1], spare, ctx.args)
            grad_scale += _direction_backward(step, *t2i, scale, home[1], home[0], spare, ctx.args)
            blocks.advance(step)
        return (home[0].to(image.dtype), home[1].to(text.dtype), grad_scale.reshape(scale.shape),
                None, None, None, None)


def ring_clip_cross_entropy(image: Tensor, text: Tensor, scale: Tensor, *, group: dist.ProcessGroup | None,
                            label_smoothing: float = 0.0, tile: int | None = None, kernel: str = "auto") -> Tensor:
    """Per-row losses [2, m] (i2t, t2i; fp32) of this rank's rows against the columns of its loss group.

    image, text [m, d]: this rank's embeddings (any float dtype; every rank of the group passes the same
    m and d, and all of them call forward and backward together). scale: the exponentiated logit scale
    (0-d). group: the loss group (None: a group of one). tile: the column tile within a block (None: the
    torch kernel takes the whole block of m columns, Triton sizes its own). Differentiable in all three.
    """
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"contrastive loss: image {tuple(image.shape)} and text {tuple(text.shape)} "
                         "embeddings must have the same shape [b, d]")
    impl = resolve_kernel(kernel, image.device)
    if tile is None and impl is tiled_ce_reference:  # the torch kernel needs a tile; Triton sizes its own
        tile = image.shape[0]
    peers = RingPeers.of(group)
    return _RingClipCrossEntropy.apply(image.contiguous(), text.contiguous(), scale, peers, label_smoothing, tile,
                                       impl)
