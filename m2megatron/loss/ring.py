"""The contrastive cross-entropy by a ring exchange of column blocks (Inf-CL): no rank holds the group's columns.

Rank r of a loss group of G ranks keeps its m local rows (image I_r, text T_r [m, d]); its columns are
the G blocks (I_o, T_o) of the group's ranks o, rank-major as in the gather path, so local row i's
positive is column i of its own block. The blocks travel around the ring (to group index r + 1,
from r − 1): at step s rank r holds the block of o = r − s and posts the hop that brings the next one
before it computes on the one in hand, so each transfer overlaps a block's tile work. G − 1 hops.

Forward: per block and direction the tiled kernel returns (row max, Σ exp(z − max), positive logit,
Σ z) for that block; they fold online (`fold_stats`: rescale to the running max), and the per-row
loss follows from the folded statistics exactly as in the one-shot kernel. Only [m] vectors are kept.

Backward: the blocks travel the ring again; each rank recomputes its tiles against the block in
hand with the global row max / log-sum, adding ∂L_r/∂(its rows) and ∂L_r/∂s locally, and writing
∂L_r/∂(block columns) into an fp32 accumulator [2, m, d] that follows the block: the accumulator of
block o starts at rank o + 1, gains one rank's contribution per hop and reaches o after G − 1 hops,
where o adds its own. So each rank receives Σ_{r' ∈ group} ∂L_{r'}/∂(its embeddings), the gather
path's semantics (contrastive.py), and ∂L_r/∂s.

Memory per rank: two blocks in the embedding dtype, three fp32 accumulators, the fp32 result, one
kernel tile — O(m·d + m·tile), independent of G (docs/LOSS.md §5). Bytes: loss/traffic.py.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from m2megatron_kernels import tiled_ce_reference
from m2megatron_kernels.tiled_ce_reference import compute_dtype, fold_stats, loss_from_stats
from torch import Tensor

from m2megatron.loss.ring_p2p import BLOCK_TAG, GRAD_TAG, Hop, RingPeers, start_hop
from m2megatron.loss.tiled_ce import resolve_kernel


def _positive_offset(step: int, rows: int) -> int:
    """row_offset of the kernels for the block in hand: 0 in this rank's own block (step 0); elsewhere
    `rows`, which puts every positive past the block's columns, i.e. none in it."""
    return 0 if step == 0 else rows


class _BlockRing:
    """Column blocks (image, text) travelling the ring: the one in hand, the next one arriving."""

    def __init__(self, peers: RingPeers, image: Tensor, text: Tensor):
        self.peers, self.block, self._spare, self._hop = peers, (image, text), None, None

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


class _GradientRing:
    """The fp32 column-gradient accumulators [2, m, d] travelling to their owners (backward)."""

    def __init__(self, peers: RingPeers, like: Tensor):
        self.peers, self._like = peers, like
        self._free: list[Tensor] = []
        self._hop: Hop | None = None
        self._outgoing = self._incoming = None

    def buffer(self) -> Tensor:
        return self._free.pop() if self._free else torch.empty_like(self._like)

    def pass_on(self, contribution: Tensor, step: int) -> None:
        """Add the accumulator that arrived for this step's block (from step 2 on) and send the sum on."""
        if step >= 2:
            contribution += self._wait()
        self._incoming = self.buffer()
        self._outgoing = contribution
        self._hop = start_hop(self.peers, [contribution], [self._incoming], GRAD_TAG)

    def _wait(self) -> Tensor:
        received = self._hop.wait()[0]
        self._free += [self._outgoing, self._incoming]  # both free once the caller has added `received`
        return received

    def collect(self) -> Tensor | None:
        """After the last step: Σ over the other ranks of ∂L/∂(this rank's block), None for G = 1."""
        return self._wait() if self._hop is not None else None


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
        peers, smoothing, tile, impl = ctx.args
        (m, d), total = image.shape, peers.size * image.shape[0]
        g_i2t, g_t2i = grad_loss[0].contiguous(), grad_loss[1].contiguous()

        def block_grads(step: int, block: tuple[Tensor, Tensor], cols_out: Tensor):
            """∂L_r/∂(image rows), ∂L_r/∂(text rows), ∂L_r/∂s against one block; ∂L_r/∂block → cols_out [2, m, d]."""
            offset = _positive_offset(step, m)
            grad_image, _, scale_i2t = impl.ce_backward(image, block[1], scale, offset, smoothing, i2t_max, i2t_log_sum,
                                                        g_i2t, tile, grad_k_out=cols_out[1], total_columns=total)
            grad_text, _, scale_t2i = impl.ce_backward(text, block[0], scale, offset, smoothing, t2i_max, t2i_log_sum,
                                                       g_t2i, tile, grad_k_out=cols_out[0], total_columns=total)
            return grad_image, grad_text, scale_i2t + scale_t2i

        # home[0], home[1]: ∂/∂(this rank's image, text) [m, d], in fp32; first its own block's column gradients.
        home = torch.empty((2, m, d), dtype=compute_dtype(image), device=image.device)
        blocks, grads = _BlockRing(peers, image, text), _GradientRing(peers, home)
        grad_scale = torch.zeros((), dtype=scale.dtype, device=scale.device)
        for step in range(peers.size):
            blocks.prefetch(step)
            cols = home if step == 0 else grads.buffer()
            grad_image, grad_text, grad_s = block_grads(step, blocks.block, cols)
            home[0] += grad_image
            home[1] += grad_text
            grad_scale += grad_s
            if step > 0:
                grads.pass_on(cols, step)
            blocks.advance(step)
        from_others = grads.collect()
        if from_others is not None:
            home += from_others
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
