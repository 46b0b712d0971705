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
    chunk_size: int | None = None
    """Column tile of the chunked log-sum-exp; None materialises the full logits matrix."""
    kernel: Literal["auto", "torch", "triton"] = "auto"
    """Chunked-loss implementation: triton on CUDA when available (auto), else plain torch."""
    label_smoothing: float = 0.0
    """Label smoothing of both cross-entropy directions."""
    logit_scale_max: float = math.log(100.0)
    """Upper bound of the learnable LOG logit scale, applied in the loss's forward: s = exp(min(logit_scale, this))."""

    def validate(self) -> None:
        if self.accumulation_steps < 1:
            raise ConfigError(f"loss.accumulation_steps: must be >= 1, got {self.accumulation_steps}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"loss.chunk_size: must be >= 1 or null, got {self.chunk_size}")
        if self.kernel == "triton" and self.chunk_size is None:
            raise ConfigError("loss.kernel: 'triton' is the chunked loss's kernel; set loss.chunk_size too")
        if not math.isfinite(self.logit_scale_max):
            raise ConfigError(f"loss.logit_scale_max: must be a finite number, got {self.logit_scale_max}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing: {self.label_smoothing} is not in [0, 1)")
