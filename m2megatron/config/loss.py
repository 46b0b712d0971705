"""The grouped image–text contrastive loss (ARCHITECTURE.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class LossConfig:
    accumulation_steps: int = 1
    """A: microbatches whose embeddings are aggregated before the loss (exact, two-pass GradCache). 1 disables accumulation."""
    chunk_size: int | None = None
    """Column tile of the chunked log-sum-exp; None materialises the full logits matrix."""
    kernel: Literal["auto", "torch", "triton"] = "auto"
    """Chunked-loss implementation: triton on CUDA when available (auto), else plain torch."""
    label_smoothing: float = 0.0
    """Label smoothing of both cross-entropy directions."""

    def validate(self) -> None:
        if self.accumulation_steps < 1:
            raise ConfigError(f"loss.accumulation_steps: must be >= 1, got {self.accumulation_steps}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"loss.chunk_size: must be >= 1 or null, got {self.chunk_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing: {self.label_smoothing} is not in [0, 1)")
