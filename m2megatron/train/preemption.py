"""Preemption: stop at a step boundary on a signal, checkpoint, mark the run, let the batch job requeue.

The convention between the trainer and the Slurm batch script (docs/SLURM.md):

1. The job asks Slurm for `--signal=B:USR1@N --requeue`. The batch shell traps SIGUSR1, touches
   `<run_dir>/PREEMPT_REQUESTED` and forwards SIGUSR1 to every process of the job step
   (`scancel --signal=USR1 $SLURM_JOB_ID`). `scancel --signal=USR1 JOB` from outside reaches the
   ranks directly. SIGTERM (scancel, time limit, Slurm's own preemption) is treated the same way.
2. Every rank builds one `PreemptionHandler(run_dir).install()` before any slow set-up, and agrees
   once per optimizer step, at the same step on every rank, whether any rank saw a stop: either
   `handler.requested()` (a collective: all_reduce MAX of each rank's flag), or, in the trainer, the
   training step carries `handler.local_flag` in its own per-step all-reduce and the trainer hands the
   outcome to `handler.adopt(...)`. So all ranks stop at the same step even though the signal reached
   them at different times (in the trainer: the step whose agreement first sees it).
3. When it returns True the trainer finishes nothing more: it saves a checkpoint of the step just
   completed (all ranks), then calls `handler.mark_preempted(step=..., checkpoint=...)` (writes
   `<run_dir>/PREEMPTED` on rank 0 only, atomically) and every rank exits with status 0.
4. When the job step has ended, the batch script finds `PREEMPTED`, moves it into the attempt's log
   folder and runs `scontrol requeue $SLURM_JOB_ID` (unless the job was cancelled or the requeue
   limit is reached). The requeued job starts the same script; `checkpoint.load=auto` resumes from
   the latest checkpoint, so no step is lost or repeated.

Only the standard library is imported at module level; torch.distributed is used when initialised.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

PREEMPTED_FILE = "PREEMPTED"
"""Written by rank 0 after the preemption checkpoint; its presence makes the batch script requeue."""
REQUEST_FILE = "PREEMPT_REQUESTED"
"""Touched by the batch shell when it gets SIGUSR1; seen by rank 0 even if a rank missed the signal."""
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Record preemption signals and agree across ranks on when to stop.

        handler = PreemptionHandler(cfg.train.run_dir).install()
        for step in range(start, cfg.train.train_steps + 1):
            train_step(...)
            if handler.requested():                       # every rank, every step
                save_checkpoint(step)                     # every rank
                handler.mark_preempted(step=step, checkpoint=path)
                return 0
    """

    def __init__(self, run_dir: str | Path | None = None, *, signals: tuple[int, ...] = DEFAULT_SIGNALS,
                 group: Any = None, check_interval: int = 1):
        """`group`: the process group to agree over (None = the default, world group).
        `check_interval`: agree only every N-th call of `requested()` (fewer collectives per step)."""
        if check_interval < 1:
            raise ValueError(f"check_interval: must be >= 1, got {check_interval}")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.signals = tuple(signals)
        self.group = group
        self.device = None
        """Device of the agreement flag (the runtime device); None: derived from the group's backend."""
        self.check_interval = check_interval
        self.reason: str | None = None
        """What this rank saw first: a signal name, 'request file' or a programmatic reason."""
        self._agreed = False
        self._calls = 0
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signals
    def install(self) -> PreemptionHandler:
        """Install the signal handlers (call from the main thread, as early as possible)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install()`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the step in flight finishes, the trainer stops at the next requested().
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def request(self, reason: str = "requested") -> None:
        """Ask for a stop from code (tests, a watchdog) exactly as a signal would."""
        if self.reason is None:
            self.reason = reason

    # ------------------------------------------------------------------ agreement
    @property
    def local_flag(self) -> bool:
        """True once this rank saw a signal, a request, or (rank 0) the batch shell's request file."""
        if self.reason is None and self.run_dir is not None and _rank() == 0:
            if (self.run_dir / REQUEST_FILE).exists():
                self.reason = "request file"
        return self.reason is not None

    def requested(self) -> bool:
        """Collective: True on every rank once any rank saw a preemption signal. Sticky once True.

        Must be called by every rank of `group` the same number of times (once per step)."""
        if self._agreed:
            return True
        self._calls += 1
        if self._calls % self.check_interval:
            return False
        self._agreed = _any_rank(self.local_flag, self.group, self.device)
        if self._agreed and self.reason is None:
            self.reason = "another rank"
        return self._agreed

    def adopt(self, any_rank: bool) -> bool:
        """Take the outcome of an agreement made elsewhere: the training step ORs this rank's `local_flag`
        over all ranks in its own all-reduce (one per step). Sticky once True, like `requested()`."""
        if any_rank and not self._agreed:
            self._agreed = True
            if self.reason is None:
                self.reason = "another rank"
        return self._agreed

    # ------------------------------------------------------------------ marker
    def mark_preempted(self, *, step: int, checkpoint: str | Path | None = None) -> Path | None:
        """After the checkpoint of `step` is complete: write <run_dir>/PREEMPTED (rank 0; others return None)."""
        if self.run_dir is None:
            raise ValueError("mark_preempted: the handler was built without a run_dir")
        if _rank() != 0:
            return None
        record = {
            "step": step,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "reason": self.reason,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return write_json_atomic(self.run_dir / PREEMPTED_FILE, record)


def write_json_atomic(path: Path, record: dict) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def read_preempted(run_dir: str | Path) -> dict | None:
    """The PREEMPTED record of `run_dir`, or None when the last attempt was not preempted."""
    path = Path(run_dir) / PREEMPTED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _any_rank(flag: bool, group: Any, device: Any = None) -> bool:
    """all_reduce(MAX) of a boolean over `group`; the flag itself when not distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return flag
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend(group) == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())
