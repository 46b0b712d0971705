"""What a long run records beyond the loss: phase timers, stragglers, loss spikes and a wandb copy of the logs."""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.config.base import ConfigError, require_at_least


@dataclass(kw_only=True)
class LoggingConfig:
    timers: int = 1
    """Phase timers (docs/TRAINING.md, "What a log interval records"). 0: none (no time/ keys, no straggler
    check). 1: the step, data wait, forward-backward, contrastive loss, gradient sync, optimizer and checkpoint
    blocking time. 2: also Megatron's per-microbatch forward/backward compute and pipeline send/receive timers
    (the pipeline wait share)."""
    straggler_factor: float = 1.5
    """A rank whose busy time per step (step time less the time spent waiting in loss, gradient and pipeline
    collectives) exceeds the median over ranks by this factor is slow for that log interval."""
    straggler_intervals: int = 3
    """Consecutive slow log intervals after which one line names the rank, its host and its slowest phase."""
    spike_sigma: float = 6.0
    """Flag a step whose loss is more than this many standard deviations above the running mean (0 = off)."""
    spike_window: int = 100
    """Steps in the running loss and grad-norm statistics."""
    spike_min_steps: int = 20
    """Steps of history before a spike can be flagged."""
    spike_grad_norm_factor: float = 10.0
    """Flag a step whose gradient norm exceeds this multiple of the running mean (0 = off)."""
    skip_spikes: bool = False
    """Skip the optimizer update of a step whose loss is flagged, as non-finite steps are skipped (counted in
    skipped_steps and spikes). A grad-norm jump is only known after the update, so it is flagged, not skipped."""
    wandb_project: str | None = None
    """Also send every logged record to this wandb project (same keys as TensorBoard); None: wandb is never
    imported. Offline with WANDB_MODE=offline; needs `pip install wandb`."""
    wandb_name: str | None = None
    """The wandb run name; None = the run directory's name."""

    def validate(self) -> None:
        if self.timers not in (0, 1, 2):
            raise ConfigError(f"logging.timers: must be 0, 1 or 2, got {self.timers}")
        if self.straggler_factor <= 1.0:
            raise ConfigError(f"logging.straggler_factor: must be > 1, got {self.straggler_factor}")
        require_at_least("logging", self, ("straggler_intervals", "spike_window", "spike_min_steps"), 1)
        require_at_least("logging", self, ("spike_sigma", "spike_grad_norm_factor"), 0, " (0 = off)")
        if self.skip_spikes and not self.spike_sigma:
            raise ConfigError("logging.skip_spikes: needs logging.spike_sigma > 0")
