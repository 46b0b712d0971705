"""N PIL decode processes: chunks of encoded images in, uint8 images out through shared memory, in order.

    pool = PilWorkerPool(size, limits, num_workers=4, chunk=32)
    pool.submit(encoded, boxes, flips)   # at most pool.depth chunks in flight
    rows = pool.result()                 # oldest chunk: per image a uint8 [3, S, S] view, or a BadSample
    pool.close()                         # stops and joins the workers

- The loader's thread reads, probes and draws the augmentation; workers only decode, so they hold no
  state and the order and the resumable position stay with the loader.
- Chunk k goes to worker k mod N and is written into slot k mod depth of one shared buffer
  [depth, chunk, 3, S, S] uint8: a file in /dev/shm mapped by every process and unlinked as soon as
  all workers have mapped it (nothing is left behind, even after a kill). A slot is written again only
  when chunk k + depth is submitted, so rows returned by `result()` stay valid until the caller's next
  `submit()`: copy what must live longer.
- Workers start with 'spawn' (default) or 'forkserver', never 'fork': the loader runs beside threads
  (its own, gloo's, NCCL's, CUDA's) that a fork would copy in an undefined state.
- A bad image is a BadSample row (counted by the loader). A worker exception, or a worker that dies,
  is a DataWorkerError naming the worker.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import queue
import tempfile
import time
import weakref

import torch

from m2megatron.data.decode_worker import map_buffer, worker_main
from m2megatron.data.image import ImageLimits
from m2megatron.data.skips import BadSample

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 5.0
POLL_S = 0.5


_LIVE: weakref.WeakSet = weakref.WeakSet()
"""Pools with running workers: closed at interpreter exit, before multiprocessing's own exit handler
(registered earlier, so it runs later) terminates them."""


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE):
        pool.close()


class DataWorkerError(RuntimeError):
    """A decode worker process failed (its traceback or exit code is in the message)."""


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class PilWorkerPool:
    """`num_workers` PIL decode processes with `per_worker` chunks of up to `chunk` images in flight each."""

    name = "pil"
    device = torch.device("cpu")
    reuses_buffers = True  # a result's rows are overwritten by the submit depth chunks later

    def __init__(self, size: int, limits: ImageLimits, num_workers: int, chunk: int, *, per_worker: int = 2,
                 start_method: str = "spawn"):
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"data workers: start method {start_method!r}: use 'spawn' or 'forkserver' ('fork' "
                             "is unsafe beside threads)")
        self.size, self.limits, self.chunk, self.num_workers = size, limits, chunk, num_workers
        self.depth = num_workers * per_worker
        self.start_method = start_method
        self._shape = (self.depth, chunk, 3, size, size)
        self._submitted = self._returned = 0
        self._done: dict[int, list] = {}
        self._sizes: dict[int, int] = {}
        self._procs: list = []
        self._inboxes: list = []
        self._outbox = None
        self.starts = 0  # how often the processes were started (close() then submit() restarts them)
        self.images_decoded = 0

    def _start(self) -> None:
        ctx = multiprocessing.get_context(self.start_method)
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.num_workers)]
        for q in (*self._inboxes, self._outbox):
            q.cancel_join_thread()  # at exit, never wait on a pipe that a dead worker no longer reads
        _LIVE.add(self)
        fd, path = tempfile.mkstemp(prefix="m2-decode-", suffix=".u8", dir=_shm_dir())
        os.close(fd)
        try:
            self._buffer = torch.from_numpy(map_buffer(path, self._shape, create=True))
            self._procs = [ctx.Process(target=worker_main, name=f"m2-decode-{i}", daemon=True,
                                       args=(i, path, self._shape, self.size, self.limits, self._inboxes[i],
                                             self._outbox))
                           for i in range(self.num_workers)]
            for proc in self._procs:
                proc.start()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        finally:
            os.unlink(path)  # every worker has mapped it (or failed): the mapping outlives the name
        self.starts += 1

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _wait_ready(self) -> None:
        ready, deadline = set(), time.monotonic() + START_TIMEOUT_S
        while len(ready) < self.num_workers:
            if time.monotonic() > deadline:
                raise DataWorkerError(f"data workers: only {len(ready)} of {self.num_workers} started within "
                                      f"{START_TIMEOUT_S:.0f} s")
            kind, index, payload = self._get()
            if kind != "ready":
                raise DataWorkerError(f"data worker {index} failed at start-up:\n{payload}")
            ready.add(index)

    def _get(self):
        """The next message from any worker; raises DataWorkerError if a worker died meanwhile."""
        while True:
            try:
                return self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                for i, proc in enumerate(self._procs):
                    if not proc.is_alive():
                        raise DataWorkerError(f"data worker {i} (pid {proc.pid}) died with exit code "
                                              f"{proc.exitcode}; see its output above") from None

    def submit(self, encoded: list[bytes], boxes: list, flips: list[bool]) -> None:
        """Queue one chunk (≤ `chunk` images) for decoding; at most `depth` may be in flight."""
        if not 0 < len(encoded) <= self.chunk:
            raise ValueError(f"data workers: a chunk of {len(encoded)} images (at most {self.chunk})")
        if not self._procs:
            self._start()
        if self._submitted - self._returned >= self.depth:
            raise RuntimeError(f"data workers: more than {self.depth} chunks in flight")
        number = self._submitted
        self._sizes[number] = len(encoded)
        job = (number, number % self.depth, list(encoded), list(boxes), [bool(f) for f in flips])
        self._inboxes[number % self.num_workers].put(job)
        self.images_decoded += len(encoded)
        self._submitted += 1

    def result(self) -> list[torch.Tensor | BadSample]:
        """The oldest chunk, per image: a view [3, S, S] into shared memory (valid until the next submit), or a
        BadSample."""
        number = self._returned
        if number >= self._submitted:
            raise RuntimeError("data workers: result() without a chunk in flight")
        while number not in self._done:
            kind, got, payload = self._get()
            if kind == "error":
                raise DataWorkerError(f"data worker for chunk {got} failed:\n{payload}")
            self._done[got] = payload
        statuses = self._done.pop(number)
        rows = self._buffer[number % self.depth, : self._sizes.pop(number)]
        self._returned += 1
        return [rows[j] if s is None else BadSample(s[0], s[1]) for j, s in enumerate(statuses)]

    def reset(self) -> None:
        """Drop the chunks in flight (waits for them); the workers keep running."""
        while self._returned < self._submitted:
            self.result()

    def close(self) -> None:
        """Stop and join the workers (killed after STOP_TIMEOUT_S); chunks in flight are dropped. A later
        submit() starts new ones."""
        started = [(inbox, proc) for inbox, proc in zip(self._inboxes, self._procs) if proc.pid is not None]
        for inbox, proc in started:
            if proc.is_alive():
                inbox.put(None)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _, proc in started:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=STOP_TIMEOUT_S)
        for q in (*self._inboxes, *([self._outbox] if self._outbox is not None else [])):
            q.close()
        _LIVE.discard(self)
        self._procs, self._inboxes, self._outbox = [], [], None
        self._done.clear()
        self._sizes.clear()
        self._submitted = self._returned = 0

    def __del__(self):
        if getattr(self, "_procs", None):
            self.close()
