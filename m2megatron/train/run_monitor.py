"""What the trainer records beside the loss: phase times over ranks, stragglers, memory, progress, spikes.

    monitor = RunMonitor(cfg, groups, stages.config.timers, batches, samples_per_step=..., tokens_per_sample=...)
    with monitor.step():                      # the 'step' phase, and counts the step
        with monitor.phase("data-wait"): ...  # any phase of runtime.timers.PHASES
    monitor.loss_spike(mean_loss, step)       # every rank, every step: True = skip this update
    monitor.grad_norm_jump(grad_norm, step)   # every rank, after the update
    record = monitor.interval(step)           # every rank, at a log interval: time/, mem/, progress keys

`interval` costs one all-gather of a few numbers per rank (and one wait for the last CUDA timer event).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from m2megatron.runtime.timers import PIPELINE_WAIT_PHASES
from m2megatron.train.memory import MEMORY_KEYS, memory_sample
from m2megatron.train.spikes import SpikeDetector, spike_line
from m2megatron.train.stragglers import StragglerDetector

log = logging.getLogger("m2megatron.train")


def global_mean_loss(loss, groups) -> float:
    """The step's loss averaged over data-parallel replicas (last-stage ranks hold it; one all-reduce)."""
    value = torch.zeros(1, device=groups.device)
    if loss is not None and groups.is_last_stage:
        value[0] = torch.as_tensor(loss, device=groups.device).float() / groups.layout.data_parallel
    dist.all_reduce(value)
    return value[0].item() / groups.layout.tensor_parallel  # TP ranks hold the same loss


class RunMonitor:
    """The trainer's phases, spike checks and interval records (see the module docstring); every rank has one."""

    def __init__(self, cfg, groups, timers, batches, *, samples_per_step: int, tokens_per_sample: int):
        """timers: the stages' `config.timers` (runtime.timers.PhaseTimers; None with logging.timers=0), which
        Megatron's schedules time themselves with."""
        self.cfg, self.groups, self.timers, self.batches = cfg, groups, timers, batches
        self.samples_per_step, self.tokens_per_sample = samples_per_step, tokens_per_sample
        self.is_logging_rank = dist.get_rank() == 0
        self.stragglers = StragglerDetector(cfg.logging.straggler_factor, cfg.logging.straggler_intervals)
        log_cfg = cfg.logging
        self.spike_detector = SpikeDetector(log_cfg.spike_sigma, log_cfg.spike_window, log_cfg.spike_min_steps,
                                            log_cfg.spike_grad_norm_factor)
        self.spikes = 0
        self.samples_seen = 0
        """Samples the run has consumed, resumes included (the trainer checkpoints it: the global batch may change)."""
        self._steps, self._since = 0, time.perf_counter()
        self._hosts: list[str] | None = None

    # ---- phases -----------------------------------------------------------------------------------
    def phase(self, name: str):
        """Time `name` (a no-op with logging.timers=0)."""
        if self.timers is None:
            return contextlib.nullcontext()
        return _Running(self.timers(name))

    @contextlib.contextmanager
    def step(self):
        with self.phase("step"):
            yield
        self._steps += 1
        self.samples_seen += self.samples_per_step

    def paused(self):
        """No timing inside (evaluation with the training stages runs Megatron's schedules too)."""
        return contextlib.nullcontext() if self.timers is None else self.timers.paused()

    # ---- spikes -----------------------------------------------------------------------------------
    def loss_spike(self, mean_loss: float, step: int) -> bool:
        """Check the step's global mean loss (the same on every rank); True: skip its update."""
        if not self.cfg.logging.spike_sigma:
            return False
        reason = self.spike_detector.loss_spike(mean_loss)
        if reason is None:
            return False
        skip = self.cfg.logging.skip_spikes
        self._report_spike(step, reason + ("; update skipped" if skip else ""))
        return skip

    def grad_norm_jump(self, grad_norm, step: int) -> None:
        """Flag a jump of the (global, the same on every rank) gradient norm of an applied update."""
        reason = self.spike_detector.grad_norm_jump(float("nan") if grad_norm is None else float(grad_norm))
        if reason is not None:
            self._report_spike(step, reason)

    def _report_spike(self, step: int, reason: str) -> None:
        keys = list(getattr(self.batches, "last_keys", []))  # the reading ranks' samples of this step
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)
        all_keys = [k for rank_keys in gathered for k in rank_keys]
        self.spikes += 1
        if self.is_logging_rank:
            log.warning(spike_line(step, reason, all_keys))
            path = Path(self.cfg.train.run_dir) / "spikes.jsonl"
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "reason": reason, "keys": all_keys}) + "\n")

    # ---- the interval record ----------------------------------------------------------------------
    def interval(self, step: int) -> dict[str, float]:
        """Phase times (ms per step: min, max and the rank of the max), memory (max over ranks), progress."""
        names = self.timers.names() if self.timers is not None else []
        local = (self.timers.read(names) if names else []) + memory_sample(self.groups.device)
        rows = _all_gather_rows(local, self.groups.device)
        steps, elapsed = max(self._steps, 1), time.perf_counter() - self._since
        self._steps, self._since = 0, time.perf_counter()
        phases = {n: [row[i] for row in rows] for i, n in enumerate(names) if any(row[i] > 0 for row in rows)}
        record = self._progress(step, elapsed / steps)
        record.update(_phase_keys(phases, steps))
        record.update(_memory_keys([row[len(names):] for row in rows], self.groups.device))
        if "step" in phases and "data-wait" in phases:
            record["data_wait_frac"] = max(d / s for d, s in zip(phases["data-wait"], phases["step"]) if s > 0)
        if "forward-backward" in phases and any(p in phases for p in PIPELINE_WAIT_PHASES):
            waits = [sum(phases[p][r] for p in PIPELINE_WAIT_PHASES if p in phases) for r in range(len(rows))]
            record["time/pipeline_wait_share"] = max(w / f for w, f in zip(waits, phases["forward-backward"]) if f)
        if "step" in phases and len(rows) > 1:
            for line in self.stragglers.observe(phases, steps, self._host_names):
                if self.is_logging_rank:
                    log.warning(line)
        return record

    def _progress(self, step: int, seconds_per_step: float) -> dict[str, float]:
        samples = self.samples_seen
        record = {"samples_seen": samples, "tokens_seen": samples * self.tokens_per_sample,
                  "eta_s": max(self.cfg.train.train_steps - step, 0) * seconds_per_step, "spikes": self.spikes}
        loader = getattr(self.batches, "loader", None)
        if loader is not None and hasattr(loader, "epoch"):  # the logging rank reads: its replica's epoch
            record["epoch"] = loader.epoch
        return record

    def _host_names(self) -> list[str]:
        """Every rank's host (one all-gather, the first time a straggler is reported; the same on all ranks)."""
        if self._hosts is None:
            self._hosts = [""] * dist.get_world_size()
            dist.all_gather_object(self._hosts, socket.gethostname())
        return self._hosts


class _Running:
    def __init__(self, timer):
        self.timer = timer

    def __enter__(self):
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.stop()


def _all_gather_rows(local: list[float], device) -> list[list[float]]:
    mine = torch.tensor(local, dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows).tolist()


def _phase_keys(phases: dict[str, list[float]], steps: int) -> dict[str, float]:
    """time/<phase>/{min_ms,max_ms,max_rank}: ms per step; min over the ranks that ran the phase."""
    record = {}
    for name, seconds in phases.items():
        key = f"time/{name.replace('-', '_')}"
        ran = [s for s in seconds if s > 0]
        top = max(range(len(seconds)), key=seconds.__getitem__)
        record[f"{key}/min_ms"] = min(ran) / steps * 1e3
        record[f"{key}/max_ms"] = seconds[top] / steps * 1e3
        record[f"{key}/max_rank"] = top
    return record


def _memory_keys(rows: list[list[float]], device) -> dict[str, float]:
    """mem/*: max over ranks (GiB) and, for the peak and the resident set, the rank that has it."""
    record = {}
    for i, key in enumerate(MEMORY_KEYS):
        if key != "mem/cpu_rss_gb" and torch.device(device).type != "cuda":
            continue
        values = [row[i] for row in rows]
        top = max(range(len(values)), key=values.__getitem__)
        record[key] = values[top]
        if key in ("mem/peak_gb", "mem/cpu_rss_gb"):
            record[f"{key}_rank"] = top
    return record
