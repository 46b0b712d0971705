"""Loss spikes and gradient-norm jumps: running statistics over the last steps, and what to log about one.

A finite loss far above the recent ones (more than `sigma` standard deviations above the running mean)
or a gradient norm far above the recent mean usually comes from a bad batch or an instability; the
samples' shards and keys say which. A flagged value does not enter the statistics.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class SpikeDetector:
    """`loss_spike(loss)` / `grad_norm_jump(norm)`: a reason string when the value is a spike, else None."""

    def __init__(self, sigma: float, window: int, min_steps: int, grad_norm_factor: float):
        self.sigma, self.min_steps, self.grad_norm_factor = sigma, min_steps, grad_norm_factor
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)

    def loss_spike(self, loss: float) -> str | None:
        if not self.sigma or not math.isfinite(loss):
            return None
        if len(self.losses) >= self.min_steps:
            mean = statistics.fmean(self.losses)
            # A floor on the spread: a flat loss must not make a rounding-level change a spike.
            std = max(statistics.pstdev(self.losses), 1e-3 * abs(mean), 1e-12)
            sigmas = (loss - mean) / std
            if sigmas > self.sigma:
                return f"loss {loss:.4g} is {sigmas:.1f} sigma above the running mean {mean:.4g} ± {std:.2g}"
        self.losses.append(loss)
        return None

    def grad_norm_jump(self, norm: float) -> str | None:
        if not self.grad_norm_factor or not math.isfinite(norm):
            return None
        if len(self.grad_norms) >= self.min_steps:
            mean = statistics.fmean(self.grad_norms)
            if norm > self.grad_norm_factor * mean:
                return f"grad norm {norm:.4g} is {norm / mean:.1f}x the running mean {mean:.4g}"
        self.grad_norms.append(norm)
        return None


def shards_of(keys: list[str]) -> list[str]:
    """The distinct shards of webdataset keys ('shard.tar:key'); other sources' keys are file names or ids."""
    return sorted({k.rsplit(":", 1)[0] for k in keys if ":" in k})


def spike_line(step: int, reason: str, keys: list[str], *, shown: int = 8) -> str:
    """The one log line of a spike: the step, why, and which samples (all keys go to spikes.jsonl)."""
    shards = shards_of(keys)
    where = f"shards {', '.join(shards)}; " if shards else ""
    more = f" … ({len(keys)} in all, spikes.jsonl)" if len(keys) > shown else ""
    samples = f"{where}keys {', '.join(keys[:shown])}{more}" if keys else "no sample keys (the loader gave none)"
    return f"spike at step {step}: {reason}; {samples}"
