"""Find a rank that is persistently slower than the others, from per-rank phase times of each log interval.

A rank's own pace is its *busy* time: the step time less the phases in which it waits for other ranks
(runtime.timers.WAIT_PHASES: the loss gather, the gradient sync, pipeline receives). The step time alone
would not do: the collectives make every rank's step as long as the slowest one's.
"""

from __future__ import annotations

import statistics

from m2megatron.runtime.timers import WAIT_PHASES


def busy_times(phases: dict[str, list[float]]) -> list[float]:
    """Per rank: the 'step' phase less its waiting phases (seconds)."""
    busy = list(phases["step"])
    for name in WAIT_PHASES:
        for rank, seconds in enumerate(phases.get(name, ())):
            busy[rank] -= seconds
    return busy


def slowest_phase(phases: dict[str, list[float]], rank: int) -> tuple[str, float]:
    """The phase (not a waiting one, nor the whole step) where `rank` exceeds the median of the ranks most."""
    excess = {name: times[rank] - statistics.median(times) for name, times in phases.items()
              if name != "step" and name not in WAIT_PHASES}
    if not excess:
        return "step", 0.0
    name = max(excess, key=excess.get)
    return name, excess[name]


class StragglerDetector:
    """Counts, per rank, consecutive intervals whose busy time exceeds `factor` × the median over ranks;
    `observe` returns one line for each rank that reaches `intervals` of them (again after every further
    `intervals`)."""

    def __init__(self, factor: float, intervals: int):
        self.factor, self.intervals = factor, intervals
        self.slow_for: dict[int, int] = {}

    def observe(self, phases: dict[str, list[float]], steps: int, hosts) -> list[str]:
        """phases: seconds per rank of the interval's phases ('step' included); hosts: a callable giving the
        host names by rank (only called when there is something to report)."""
        busy = busy_times(phases)
        median = statistics.median(busy)
        slow = {r for r, t in enumerate(busy) if median > 0 and t > self.factor * median}
        self.slow_for = {r: self.slow_for.get(r, 0) + 1 for r in slow}
        lines = []
        for rank in sorted(slow):
            if self.slow_for[rank] % self.intervals:
                continue
            phase, excess = slowest_phase(phases, rank)
            lines.append(f"straggler: rank {rank} on {hosts()[rank]} has been slow for {self.slow_for[rank]} log "
                         f"intervals: busy {busy[rank] / steps * 1e3:.1f} ms/step vs the median "
                         f"{median / steps * 1e3:.1f} ms; slowest phase {phase.replace('-', ' ')} "
                         f"(+{excess / steps * 1e3:.1f} ms/step over the median)")
        return lines
