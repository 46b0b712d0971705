"""How the packed activation lies on the TP ranks with Megatron sequence parallelism (SP).

Without SP every TP rank holds the whole packed tensor [S_img + S_txt, b, D]. With SP each segment
(image, text) is padded at its end to a multiple of TP, S_pad = ⌈S / TP⌉·TP, and TP rank r holds rows
[r·S_pad/TP, (r+1)·S_pad/TP) of each padded segment; the two shards are packed as before:

    rank r: [S_img_pad/TP + S_txt_pad/TP, b, D] = image rows of r, then text rows of r

so every stage still splits image from text by counting rows (the text shard is the last S_txt_pad/TP),
Megatron's layers see [s/TP, b, h] per segment (their column-parallel linears all-gather it, their
row-parallel linears reduce-scatter back), and Megatron's schedules, told the padded total
(`packed_seq_length`), divide it by TP for the p2p buffers. The CLS token stays row 0 of its segment,
i.e. the first row of TP rank 0's shard. Padded positions are zeros at entry, are masked as keys in
every attention (the text key mask is padded with "masked"; the image segment gets a key mask when
it is padded), and never reach an output (the heads read only the CLS rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.utils import get_pg_rank, get_pg_size

from m2megatron.config.model import ModelConfig

SEGMENTS = ("image", "text")


def padded_length(tokens: int, tp_size: int, sequence_parallel: bool) -> int:
    """A segment's rows over all TP ranks: `tokens` rounded up to a multiple of TP under SP."""
    return -(-tokens // tp_size) * tp_size if sequence_parallel else tokens


def packed_seq_length(cfg: ModelConfig, tp_size: int = 1, sequence_parallel: bool = False,
                      segments: tuple[str, ...] = SEGMENTS) -> int:
    """The `seq_length` to give Megatron's schedules for a packed activation of `segments`.

    The padded total; under SP the schedules divide it by TP (each padded segment divides evenly).
    """
    tokens = {"image": cfg.num_image_tokens, "text": cfg.max_text_len}
    unknown = set(segments) - set(tokens)
    if unknown:
        raise ValueError(f"packed_seq_length: unknown segments {sorted(unknown)} (known: image, text)")
    return sum(padded_length(tokens[s], tp_size, sequence_parallel) for s in segments)


class SegmentShards:
    """One segment of `tokens` rows under this rank's TP group: padding, scatter, masks, the CLS row.

    With `sequence_parallel` False (or TP = 1) every method is the identity of the unsplit layout.
    """

    def __init__(self, tokens: int, tp_group, sequence_parallel: bool):
        self.tp_group = tp_group
        self.tp_size = get_pg_size(tp_group)
        self.split = bool(sequence_parallel) and self.tp_size > 1
        self.tokens = tokens
        self.padded = padded_length(tokens, self.tp_size, self.split)
        self.local = self.padded // self.tp_size if self.split else tokens
        """Rows of this segment on this rank."""

    @property
    def is_padded(self) -> bool:
        return self.padded > self.tokens

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Full segment [S, b, D] (same on every TP rank) → this rank's shard [S_pad/TP, b, D]."""
        if not self.split:
            return x
        x = F.pad(x, (0, 0, 0, 0, 0, self.padded - self.tokens))  # [S_pad, b, D], zeros at the end
        return scatter_to_sequence_parallel_region(x, group=self.tp_group)

    def valid(self, mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """1 for real tokens over the padded segment, [b, S_pad] (`mask` [b, S] is the text mask; None: all real)."""
        if mask is None:
            mask = torch.ones(batch, self.tokens, dtype=torch.long, device=device)
        if self.is_padded:
            mask = F.pad(mask.long(), (0, self.padded - self.tokens))  # padding counts as masked
        return mask

    def key_mask(self, mask: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """Megatron's key mask [b, 1, 1, S_pad], True = masked; None when nothing is masked (no mask, no padding)."""
        if mask is None and not self.is_padded:
            return None
        return (self.valid(mask, batch, device) == 0)[:, None, None, :]

    def local_rows(self, per_token: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor over the padded segment, [S_pad, ...] → [S_pad/TP, ...]."""
        if not self.split:
            return per_token
        rank = get_pg_rank(self.tp_group)
        return per_token[rank * self.local:(rank + 1) * self.local]

    def first_row(self, x: torch.Tensor) -> torch.Tensor:
        """Row 0 of the segment (the CLS token) on every TP rank, [b, D], from this rank's shard [S_local, b, D].

        Under SP it sits on TP rank 0: each rank contributes its first row to an all-gather [TP, b, D]
        whose backward hands each rank its own row's gradient (what follows is replicated on all ranks).
        """
        if not self.split:
            return x[0]
        firsts = gather_from_sequence_parallel_region(x[:1], tensor_parallel_output_grad=False,
                                                      group=self.tp_group)  # [TP, b, D]
        return firsts[0]
