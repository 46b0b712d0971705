"""Run test bodies on N gloo processes, paying process start-up once per world size.

`DistributedPool(n)` spawns n workers that each join one gloo process group and apply the CPU
workarounds, then wait for work. `pool.run(fn, *args)` runs the module-level function `fn` on every
rank and returns the per-rank results in rank order. If any rank raises, the pool is torn down (its
collectives may be half-done) and an error carrying each failing rank's traceback is raised; the
next `run` starts a fresh pool. Each body sets up the Megatron layout it needs with
`m2megatron.parallel.build_groups`.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600
COLLECTIVE_TIMEOUT_S = 120
MAX_WORKER_THREADS = 300
"""Each gloo process group holds threads; Megatron creates some groups it never frees (e.g. one per
optimizer build), so a worker past this many threads is replaced after its run."""


class DistributedTestError(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Workers are daemons (they die with pytest), but dist_checkpointing's writer starts a
    # multiprocessing manager, which a daemonic process may not; let this one have children.
    mp.current_process()._config["daemon"] = False
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        from m2megatron.parallel import cpu_compat

        cpu_compat.apply()
        outbox.put((rank, "ready", None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        outbox.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = inbox.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = fn(*args, **kwargs)
            outbox.put((rank, "ok", result))
        except BaseException:  # noqa: BLE001
            outbox.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class DistributedPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._procs: list = []
        self._inboxes: list = []
        self._outbox = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self._inboxes[r], self._outbox),
                                   daemon=True) for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self._collect(STARTUP_TIMEOUT_S, what="start-up")

    def _collect(self, timeout_s: float, what: str) -> list:
        results: list = [None] * self.world_size
        errors: dict[int, str] = {}
        pending = set(range(self.world_size))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        while pending:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                self.close()
                raise DistributedTestError(self._report(what, errors, f"ranks {sorted(pending)} timed out"))
            try:
                rank, status, payload = self._outbox.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [r for r in pending if not self._procs[r].is_alive()]
                if dead:
                    self.close()
                    raise DistributedTestError(self._report(what, errors, f"ranks {dead} died")) from None
                continue
            pending.discard(rank)
            if status == "error":
                errors[rank] = payload
                # The other ranks may now wait in a collective until its timeout; don't wait for them.
                self.close()
                raise DistributedTestError(self._report(what, errors, ""))
            results[rank] = payload
        return results

    def _report(self, what: str, errors: dict[int, str], extra: str) -> str:
        parts = [f"distributed {what} failed on {self.world_size} ranks. {extra}"]
        for rank, tb in sorted(errors.items()):
            parts.append(f"--- rank {rank} ---\n{tb}")
        return "\n".join(parts)

    def run(self, fn, *args, timeout_s: float = RUN_TIMEOUT_S, **kwargs) -> list:
        if not self._procs:
            self._start()
        for inbox in self._inboxes:
            inbox.put((fn, args, kwargs))
        results = self._collect(timeout_s, what=f"run of {fn.__module__}.{fn.__qualname__}")
        if self._max_threads() > MAX_WORKER_THREADS:
            self.close()  # start afresh next time rather than let leaked gloo groups pile up
        return results

    def _max_threads(self) -> int:
        counts = [0]
        for proc in self._procs:
            try:
                counts.append(len(os.listdir(f"/proc/{proc.pid}/task")))
            except OSError:
                pass
        return max(counts)

    def close(self) -> None:
        for inbox, proc in zip(self._inboxes, self._procs):
            if proc.is_alive():
                try:
                    inbox.put(None)
                except Exception:  # noqa: BLE001
                    pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self._procs, self._inboxes = [], []
