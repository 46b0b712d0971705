"""The one collective of the contrastive loss: an all-gather over the loss group that passes gradients.

Forward all-gathers the local rows of every rank of `group` (rank order); backward reduce-scatters
(sums) the gradient of the gathered tensor, so each rank receives Σ_r ∂L_r/∂(its rows) over the
group's per-rank losses L_r. This is Megatron-Core's sequence-parallel gather
(all-gather along dim 0, reduce-scatter backward), used with an explicit group; we do not use
torch.distributed.nn.functional.all_gather, whose backward fails for sub-groups on gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from torch import Tensor


def group_size_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(G, this rank's index in the group); (1, 0) for no group."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_pairs_with_grad(image: Tensor, text: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Gather image and text rows [b, d] of the group in one all-gather → pairs [G·b, 2, d].

    pairs[r·b + i] = (image row i, text row i) of group rank r. `group=None` means a group of one.
    """
    if image.shape != text.shape:
        raise ValueError(f"contrastive loss: image {tuple(image.shape)} and text {tuple(text.shape)} "
                         "embeddings must have the same shape [b, d]")
    pairs = torch.stack([image, text], dim=1)  # [b, 2, d]: one collective for both modalities
    if group is None or dist.get_world_size(group) == 1:
        return pairs
    return gather_from_sequence_parallel_region(pairs, tensor_parallel_output_grad=True, group=group)
