"""One trainer per run directory: a lock file that names its holder, taken over only from a dead holder.

    locks = lock_run_directories([run_dir, save_dir])   # collective; global rank 0 holds the files
    ...
    for lock in locks: lock.release()

Two trainers on one run (say, workers a killed launcher left running, and a new start) interleave their
checkpoint saves and leave checkpoints with missing shards. So global rank 0 creates `<dir>/train.lock`
(O_EXCL) holding its host, boot id, PID and the PID's start time, the Slurm job id and restart count,
and refreshes the file's modification time every HEARTBEAT_S seconds from a background thread. The
other ranks learn the outcome from rank 0, so a multi-node job holds one lock, whatever node rank 0
is on. A second trainer finds the file and is refused with one line naming the holder, unless the
holder is gone (`takeover_reason`):

- it is this very process (a trainer that was not closed);
- the same Slurm job with another restart count: a requeue (Slurm ends a job's processes before it
  requeues it);
- the same host (and boot): its PID no longer exists, or belongs to a newer process;
- another host: its Slurm job has left the queue (squeue), or its heartbeat is older than STALE_AFTER_S.

A takeover renames the old file away atomically (only one contender can), checks that it renamed the
file it judged, and creates a new one. Assumes that processes on one host see each other's PIDs (a
shared PID namespace, as under Slurm and enroot/pyxis) and that hosts' clocks agree with the file
server's to well within STALE_AFTER_S.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

from m2megatron.config.base import InputError

log = logging.getLogger("m2megatron.train")

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_LIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                      "SIGNALING", "STAGE_OUT", "STOPPED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}


class RunDirectoryInUse(InputError):
    """Another live trainer holds the run or checkpoint directory; the message names it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Holder:
    host: str
    boot_id: str
    pid: int
    pid_start: int | None
    job_id: str | None
    restart_count: int
    started: str
    token: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(host=socket.gethostname(), boot_id=_boot_id(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                   job_id=os.environ.get("SLURM_JOB_ID"), restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                   started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   token=uuid.uuid4().hex)

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        try:
            fields = json.loads(raw)
            return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        job = f"Slurm job {self.job_id} (attempt {self.restart_count})" if self.job_id else "no Slurm job"
        return f"host {self.host}, PID {self.pid}, {job}, started {self.started}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a PID's reuse apart), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _pid_start(pid)
    return start is None or now is None or now == start


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from squeue ('GONE' when it has left the queue); None when squeue cannot tell."""
    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        run = subprocess.run([exe, "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if run.returncode == 0:
        return run.stdout.strip().split("\n")[0].strip() or "GONE"
    return "GONE" if "invalid job id" in run.stderr.lower() else None


def takeover_reason(holder: Holder, me: Holder, age_s: float, *, stale_after_s: float = STALE_AFTER_S,
                    job_state=slurm_job_state) -> str | None:
    """Why the lock of `holder` may be taken over by `me`, or None while the holder may be alive."""
    if (holder.host, holder.boot_id, holder.pid) == (me.host, me.boot_id, me.pid):
        return "it is held by this process (a trainer that was not closed)"
    if holder.job_id and holder.job_id == me.job_id and holder.restart_count != me.restart_count:
        return f"Slurm requeued job {me.job_id} (attempt {holder.restart_count} -> {me.restart_count})"
    if holder.host == me.host:
        if holder.boot_id != me.boot_id:
            return f"host {me.host} rebooted since"
        if not _pid_alive(holder.pid, holder.pid_start):
            return f"PID {holder.pid} on {me.host} is gone"
        return None
    if holder.job_id:
        state = job_state(holder.job_id)
        if state is not None and state.split()[0] not in _LIVE_SLURM_STATES:
            return f"Slurm job {holder.job_id} has ended ({state})"
    if age_s > stale_after_s:
        return f"its heartbeat is {age_s:.0f}s old (stale after {stale_after_s:.0f}s)"
    return None


class RunLock:
    """`<directory>/train.lock`, held by this process from acquire() to release()."""

    def __init__(self, directory: str | Path, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, job_state=slurm_job_state):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.heartbeat_s, self.stale_after_s, self.job_state = heartbeat_s, stale_after_s, job_state
        self.me = Holder.this_process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunDirectoryInUse naming the live holder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return self
            raw, age = self._read()
            if raw is None:
                continue  # removed meanwhile: try again
            holder = Holder.parse(raw)
            if holder is None:
                if age < 10.0:  # being written by a contender right now
                    time.sleep(1.0)
                    continue
                reason = "the lock file is unreadable"
            else:
                reason = takeover_reason(holder, self.me, age, stale_after_s=self.stale_after_s,
                                         job_state=self.job_state)
                if reason is None:
                    raise RunDirectoryInUse(
                        f"{self.directory} is in use by another trainer: {holder.describe()}, last heartbeat "
                        f"{age:.0f}s ago; stop it first (if it is gone, delete {self.path})")
            if self._remove_if_unchanged(raw):
                log.warning("%s: taking over the lock of %s: %s", self.directory,
                            holder.describe() if holder else "an unknown holder", reason)
        raise RunDirectoryInUse(f"{self.directory}: could not take {self.path}, other trainers keep taking it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._is_ours():
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self.me), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[bytes | None, float]:
        try:
            raw = self.path.read_bytes()
            return raw, max(0.0, time.time() - self.path.stat().st_mtime)
        except FileNotFoundError:
            return None, 0.0

    def _remove_if_unchanged(self, judged: bytes) -> bool:
        """Rename the lock away (atomic: one contender wins); put it back if it is not the one judged."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if aside.read_bytes() != judged:  # a new holder came in between: give its lock back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _is_ours(self) -> bool:
        raw, _ = self._read()
        holder = Holder.parse(raw) if raw is not None else None
        return holder is not None and holder.token == self.me.token

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"run-lock {self.directory}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._is_ours():
                log.error("%s: the run lock was taken over by another trainer; this one keeps running", self.path)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass


def lock_run_directories(directories: list[str | Path]) -> list[RunLock]:
    """Collective: global rank 0 takes the lock of each directory; every rank raises the same
    RunDirectoryInUse when one is refused. Returns the locks held (on rank 0; [] elsewhere)."""
    import torch.distributed as dist

    locks: list[RunLock] = []
    error = None
    if dist.get_rank() == 0:
        try:
            for directory in dict.fromkeys(Path(d).resolve() for d in directories):
                locks.append(RunLock(directory).acquire())
        except RunDirectoryInUse as exc:
            for lock in locks:
                lock.release()
            locks, error = [], str(exc)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RunDirectoryInUse(box[0])
    return locks
