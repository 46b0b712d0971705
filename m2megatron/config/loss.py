"""The grouped image–text contrastive loss (ARCHITECTURE.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class LossConfig:
    accumulation_steps: int = 1
    """A: microbatches whose embeddings are aggregated before the loss (exact, two-pass GradCache).
    1 disables accumulation."""
    exchange: Literal["gather", "ring"] = "gather"
    """How the columns of the loss group reach each rank. gather: one all-gather of the group's G·A·b
    columns (peak memory grows with G). ring: column blocks pass around the group with p2p, G − 1 hops
    each way overlapped with the tile work, the log-sum-exp accumulated online; peak memory
    O(A·b·d + A·b·tile), independent of G, for about the bytes of gather (docs/LOSS.md §5).
    Same loss and gradients."""
    chunk_size: int | None = None
    """Column tile of the chunked log-sum-exp; None materialises the full logits matrix (with exchange=ring:
    each rank's block of A·b columns is one tile)."""
    kernel: Literal["auto", "torch", "triton"] = "auto"
    """Tiled-loss implementation (chunked or ring): triton on CUDA when available (auto), else plain torch."""
    label_smoothing: float = 0.0
    """Label smoothing of both cross-entropy directions."""
    logit_scale_max: float = math.log(100.0)
    """Upper bound of the learnable LOG logit scale, applied in the loss's forward: s = exp(min(logit_scale, this))."""

    def validate(self) -> None:
        if self.accumulation_steps < 1:
            raise ConfigError(f"loss.accumulation_steps: must be >= 1, got {self.accumulation_steps}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"loss.chunk_size: must be >= 1 or null, got {self.chunk_size}")
        if self.exchange not in ("gather", "ring"):
            raise ConfigError(f"loss.exchange: {self.exchange!r} is not one of ['gather', 'ring']")
        if self.kernel == "triton" and self.chunk_size is None and self.exchange == "gather":
            raise ConfigError("loss.kernel: 'triton' is the tiled loss's kernel; set loss.chunk_size or "
                              "loss.exchange: ring too")
        if not math.isfinite(self.logit_scale_max):
            raise ConfigError(f"loss.logit_scale_max: must be a finite number, got {self.logit_scale_max}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing: {self.label_smoothing} is not in [0, 1)")
