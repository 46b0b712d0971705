"""Distributed checkpoints: where, how often, how many."""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class CheckpointConfig:
    save_dir: str | None = None
    """Checkpoint directory; None = run_dir/checkpoints."""
    save_interval: int = 0
    """Steps between checkpoints; 0 saves only at the end (and on a preemption signal)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a newer one is visible."""
    load: str | None = "auto"
    """Checkpoint to start from: 'auto' resumes from save_dir/latest if present, a path loads that,
    None starts fresh."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")
        if self.save_interval < 0:
            raise ConfigError("checkpoint.save_interval: must be >= 0")
