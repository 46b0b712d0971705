"""Per-phase wall times of the training step, behind Megatron-Core's `config.timers` interface.

    timers = PhaseTimers(level=1, device=device)    # in the TransformerConfig: Megatron's schedules,
    timers("data-wait", 1).start() ... .stop()       # finalize_model_grads and optimizer time themselves
    seconds = timers.read(PHASES)                    # this rank's seconds per phase since the last read

Megatron's `Timers` keeps the names and levels (a timer above the level is its no-op DummyTimer); only the
timer itself is ours, because Megatron's calls torch.cuda.synchronize() at every start and stop. Ours
records a CUDA event pair on the current stream instead, and `read()` waits once, for the last event, per
log interval: no host sync per phase. On the GPU a phase therefore measures stream time between its
marks (a host-side wait such as data loading shows only where the GPU ran dry); on the CPU it is the host's
wall time (time.perf_counter) between start and stop.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from megatron.core.timers import Timer, TimerBase, Timers

PHASES: dict[str, int] = {
    # ours (trainer and runtime)
    "step": 1, "data-wait": 1, "loss": 1, "optimizer": 1, "checkpoint": 1,
    # Megatron-Core's, under the names its schedules and finalize_model_grads use
    "forward-backward": 1, "all-grads-sync": 1,
    "forward-compute": 2, "backward-compute": 2,
    "forward-recv": 2, "backward-recv": 2, "forward-send": 2, "backward-send": 2,
    "forward-send-backward-recv": 2, "backward-send-forward-recv": 2,
    "forward-send-forward-recv": 2, "backward-send-backward-recv": 2,
    "forward-backward-send-forward-backward-recv": 2,
}
"""Every phase the report knows, with the level that records it (the same list on every rank)."""

WAIT_PHASES = ("loss", "all-grads-sync", "forward-recv", "backward-recv",
               "forward-send-backward-recv", "backward-send-forward-recv", "forward-send-forward-recv",
               "backward-send-backward-recv", "forward-backward-send-forward-backward-recv")
"""Phases in which a rank mostly waits for other ranks (collectives, pipeline receives)."""

PIPELINE_WAIT_PHASES = WAIT_PHASES[2:]


class PhaseTimer(TimerBase):
    """Accumulates start–stop intervals: CUDA event pairs on a GPU, perf_counter on the host."""

    def __init__(self, name: str, device: torch.device):
        super().__init__(name)
        self._cuda = torch.device(device).type == "cuda"
        self._pairs: list = []  # CUDA: (start, stop) events of this interval
        self._seconds = 0.0
        self._started = None

    def start(self, barrier: bool = False) -> None:
        if self._started is not None:
            raise RuntimeError(f"timer {self.name}: started twice")
        if barrier:
            dist.barrier()
        if self._cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        if self._started is None:
            raise RuntimeError(f"timer {self.name}: stopped before it started")
        if barrier:
            dist.barrier()
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs.append((self._started, end))
        else:
            self._seconds += time.perf_counter() - self._started
        self._started = None

    def reset(self) -> None:
        self._pairs, self._seconds = [], 0.0

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Seconds in the finished intervals (a running one counts up to its stop)."""
        if self._pairs:
            for _, end in reversed(self._pairs):  # the last waits; the others (same stream) are done by then
                end.synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
            self._pairs = []
        seconds = self._seconds
        if reset:
            self._seconds = 0.0
        return seconds


class PhaseTimers(Timers):
    """Megatron's Timers (names, levels, DummyTimer above the level) with `PhaseTimer`s."""

    def __init__(self, level: int, device: torch.device):
        super().__init__(level, "minmax")
        self.level = level
        self.device = torch.device(device)
        self._paused = False

    def __call__(self, name: str, log_level: int | None = None):
        if self._paused:
            return self._dummy_timer
        timer = super().__call__(name, PHASES.get(name, log_level) if log_level is None else log_level)
        if type(timer) is Timer:  # just made by Megatron: replace it with ours
            timer = self._timers[name] = PhaseTimer(name, self.device)
        return timer

    @contextlib.contextmanager
    def paused(self):
        """Every timer a no-op inside (evaluation with the training stages runs the schedules too)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def read(self, names) -> list[float]:
        """This rank's seconds per phase of `names` since the last read (0 for a phase it never ran)."""
        return [self._timers[n].elapsed(reset=True) if n in self._timers else 0.0 for n in names]

    def names(self) -> list[str]:
        """The phases this level records, in PHASES order (the same on every rank)."""
        return [name for name, level in PHASES.items() if level <= self.level]
