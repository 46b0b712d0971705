"""Run test bodies on N gloo processes, paying process start-up once per world size.

`DistributedPool(n)` spawns n workers that each come up through m2megatron's bootstrap (one gloo process
group, the CPU patches), then wait for work. `pool.run(fn, *args)` runs the module-level function `fn` on every
rank and returns the per-rank results in rank order. If any rank raises, the pool is torn down (its
collectives may be half-done) and an error carrying each failing rank's traceback is raised; the
next `run` starts a fresh pool. Each body sets up the Megatron layout it needs with
`m2megatron.parallel.build_groups`.

Workers are forked from one forkserver that imported torch, Megatron-Core and m2megatron once
(PRELOAD): importing them costs a spawned worker ~6 s of CPU, which on 2 cores made an 8-rank pool
take ~25 s to start. PRELOAD starts no Python thread, and torch is fork-safe after import (DataLoader
workers rely on it); process groups and the CPU workarounds are set up after the fork, in each worker.
"""

from __future__ import annotations

import datetime
import os
import queue
import traceback

import torch.multiprocessing as mp

STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600
COLLECTIVE_TIMEOUT_S = 120
MAX_WORKER_THREADS = 300
"""Each gloo process group holds threads; Megatron creates some groups it never frees (e.g. one per
optimizer build), so a worker past this many threads is replaced after its run."""


PRELOAD = ["m2megatron", "torch", "torch.distributed", "megatron.core", "megatron.core.pipeline_parallel",
           "megatron.core.optimizer", "megatron.core.distributed", "megatron.core.dist_checkpointing",
           "m2megatron.parallel", "m2megatron.runtime", "m2megatron.train", "m2megatron.checkpoint",
           # What a training body imports next: ~0.9 s of CPU in every worker otherwise (torch._dynamo, at the
           # first optimizer, is most of it). Not the eval launchers: `python -m` of a preloaded module warns.
           "torch._dynamo", "megatron.core.transformer.transformer_block",
           "megatron.core.dist_checkpointing.strategies.torch", "PIL.ImageDraw", "PIL.ImageFont", "sentencepiece",
           "numpy.random", "m2megatron.models", "m2megatron.loss", "m2megatron.data.build", "m2megatron.data.loader",
           "m2megatron.data.synthetic", "m2megatron.eval.during_training", "m2megatron.planning",
           "m2megatron.train.trainer"]
"""Modules the forkserver imports before it forks any worker."""


_ENV_AT_IMPORT = dict(os.environ)
"""The forkserver's environment, inherited by every process it forks: the session's, as it was before any
test changed it (the server starts lazily, perhaps inside a test that monkeypatches os.environ)."""


def forkserver_context():
    """The multiprocessing context of the preloaded forkserver (started on first use)."""
    import multiprocessing.forkserver as forkserver

    ctx = mp.get_context("forkserver")
    if forkserver._forkserver._forkserver_pid is not None:  # already running, with the session's environment
        return ctx
    ctx.set_forkserver_preload(PRELOAD)
    current = dict(os.environ)
    os.environ.clear()
    os.environ.update(_ENV_AT_IMPORT)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(current)
    return ctx


class DistributedTestError(AssertionError):
    pass


def _fresh(fn, args: tuple, log_path: str) -> None:
    os.setsid()  # its own session: the caller can kill whatever it leaves behind (Megatron's writer manager)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    mp.current_process()._config["daemon"] = False  # it may start children of its own
    fn(*args)


def start_fresh_process(fn, *args, log_path: str):
    """A new process, forked from the preloaded forkserver, running module-level `fn(*args)` with its stdout
    and stderr in `log_path`: a separate process for a test that kills it, without ~6 s of imports.
    Returns the started multiprocessing.Process (its own session: os.killpg(p.pid, ...) cleans up)."""
    proc = forkserver_context().Process(target=_fresh, args=(fn, args, str(log_path)), daemon=False)
    proc.start()
    return proc


def _run(how: str, what: str, args: tuple, cwd, env, timeout: float, input: str):
    import subprocess
    import sys

    command = [sys.executable, *{"-m": ["-m", what], "-c": ["-c", what], "script": [what]}[how], *args]
    return subprocess.run(command, cwd=str(cwd or os.getcwd()), env=dict(os.environ if env is None else env),
                          input=input, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)


def run_module(module: str, *args: str, cwd=None, env: dict | None = None, timeout: float = 300, input: str = ""):
    """`python -m module args...`, the command a user runs, in a new interpreter: a subprocess.CompletedProcess
    (text stdout/stderr). Where a fresh interpreter is not the point, call the module's `main(argv)` instead."""
    return _run("-m", module, args, cwd, env, timeout, input)


def run_code(code: str, *, cwd=None, env: dict | None = None, timeout: float = 300, input: str = ""):
    """`python -c code`, as run_module runs a module."""
    return _run("-c", code, (), cwd, env, timeout, input)


def run_script(path: str, *args: str, cwd=None, env: dict | None = None, timeout: float = 300, input: str = ""):
    """`python path args...`, as run_module runs a module."""
    return _run("script", str(path), args, cwd, env, timeout, input)


def _worker(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Workers are daemons (they die with pytest), but dist_checkpointing's writer starts a
    # multiprocessing manager, which a daemonic process may not; let this one have children.
    mp.current_process()._config["daemon"] = False
    import torch
    import torch.distributed as dist

    from m2megatron.config.parallel import ParallelConfig
    from m2megatron.parallel.bootstrap import initialize, local_rank_env

    torch.set_num_threads(1)
    try:
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)  # starts no thread
        # The bootstrap: the checkpoint writer's queue (forked), the process group, the CPU patches.
        initialize(ParallelConfig(timeout_s=COLLECTIVE_TIMEOUT_S), local_rank_env(rank, world_size, store=store),
                   megatron_state=False)
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
        self._store = None

    def _start(self) -> None:
        import torch.distributed as dist

        ctx = forkserver_context()
        # The pool's rendezvous store lives here, on a port the OS picked: a port probed free and then bound
        # by rank 0 could be taken in between by another test worker (EADDRINUSE, seen under xdist).
        self._store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        port = self._store.port
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
        self._procs, self._inboxes, self._store = [], [], None


def run_under_triton_interpreter(script: str, timeout: float) -> object:
    """Run the test file `script` as a program in a fresh interpreter with TRITON_INTERPRET=1 (it must hold before
    triton is imported, so not in this process) and return the JSON of its last output line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)  # the script imports tests.*
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
