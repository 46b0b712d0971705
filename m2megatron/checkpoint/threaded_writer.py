"""Megatron's checkpoint writes without forking the trainer: threads of this process do them.

Megatron-Core writes a rank's shard files in worker processes it forks: `write_preloaded_data_multiproc`
forks one per file bucket, and an async save (`AsyncCallsQueue(persistent=False)`) first forks the whole
trainer to run that. A trainer must not fork once it holds a CUDA context, NCCL communicators or other
threads (the child inherits locks held by threads that do not exist in it; compat/writer_queue.py).
Megatron's persistent caller spawns a fresh interpreter instead, but it sets a CUDA device in it (no CPU
runs) and reads the live tensors through shared memory (no snapshot on the CPU).

So we keep Megatron's request (its plan, its per-bucket file writer `write_preloaded_data`, its results
queue and finalization) and change only who runs it:

- `without_forks(request)` replaces the request's forking write function by `write_buckets`, which runs
  Megatron's per-bucket writer in one thread per bucket of the calling thread's process;
- `for_background(request)` also snapshots the tensors when the save is scheduled (a copy in host
  memory: the D2H copy Megatron makes on a GPU anyway; on the CPU a clone, so training may update the
  parameters in place while the thread writes);
- `ThreadAsyncCaller` is Megatron's `AsyncCaller` interface run by a thread: `AsyncCallsQueue`
  schedules, polls (the same collective all-reduce) and finalizes as with its own callers.

File I/O, serialization copies and CRC-32 release the GIL, so the writing threads overlap the training
step much as the forked writer did. (Megatron's per-bucket writer pauses Python's cyclic garbage collector
while it runs; in a thread that pause applies to the whole process for the length of the write.)
"""

from __future__ import annotations

import functools
import queue
import threading

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync


def without_forks(request: AsyncRequest) -> AsyncRequest:
    """`request` with Megatron's forking writer replaced by `write_buckets` (same arguments, same results)."""
    fn = request.async_fn
    if fn is None:
        return request
    if not (isinstance(fn, functools.partial) and fn.func == FileSystemWriterAsync.write_preloaded_data_multiproc):
        raise RuntimeError(f"checkpoint save: megatron-core's writer changed (got {fn!r}); "
                           "m2megatron.checkpoint.threaded_writer needs updating")
    transform_list, use_msc = fn.args
    return request._replace(async_fn=functools.partial(write_buckets, transform_list, use_msc))


def for_background(request: AsyncRequest) -> AsyncRequest:
    """`without_forks(request)` whose tensors are copied to host memory when the save is scheduled."""
    request = without_forks(request)
    return request._replace(preload_fn=functools.partial(snapshot, request.async_fn_args[1])) \
        if request.async_fn is not None else request


def snapshot(write_buckets: list) -> list:
    """The write buckets with every tensor copied to host memory (not shared with the live parameters)."""
    out = []
    for file_name, storage_key, (bytes_data, tensor_data) in write_buckets:
        copies = [(item, tensor.detach().to("cpu", copy=True)) for item, tensor in tensor_data]
        out.append((file_name, storage_key, (bytes_data, copies)))
    return out


def write_buckets(transform_list: list, use_msc: bool, rank: int, buckets: list, results_queue) -> None:
    """Write each bucket to its file with Megatron's `write_preloaded_data`, one thread per bucket, and put
    {bucket index: write results} (or the first exception) on `results_queue`, as
    `write_preloaded_data_multiproc` does from its forked workers."""
    local_results: queue.Queue = queue.Queue()
    count: queue.Queue = queue.Queue()
    extra = {"use_msc": use_msc} if use_msc else {}
    threads = []
    for i, bucket in enumerate(buckets):
        count.put(i)
        threads.append(threading.Thread(target=FileSystemWriterAsync.write_preloaded_data,
                                        args=(transform_list, i, bucket, local_results, count, True),
                                        kwargs=extra, name=f"checkpoint-write-{rank}-{i}", daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results: dict | Exception = {}
    while not local_results.empty():
        index, value = local_results.get()
        if isinstance(value, Exception):
            results = value
            break
        results[index] = value
    results_queue.put(results)


class ThreadAsyncCaller(AsyncCaller):
    """Runs one async request at a time in a thread of this process (Megatron's AsyncCaller interface)."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        if async_req.async_fn is None:
            return
        args = list(async_req.async_fn_args)
        if async_req.preload_fn is not None:
            args[1] = async_req.preload_fn()  # the snapshot, taken before training goes on

        def run() -> None:
            try:
                async_req.async_fn(*args, **async_req.async_fn_kwargs)
            except BaseException as exc:  # reported at finalization, on the training thread
                self.error = exc

        self.thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        alive = int(self.thread is not None and self.thread.is_alive())
        done = not alive if no_dist else self.sync_all_async_calls(alive)
        if done or blocking:
            self.close()
            done = True
        return done

    def close(self, abort: bool = False) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"checkpoint writer thread failed: {error}") from error

    def __del__(self) -> None:
        pass


def threaded_calls_queue() -> AsyncCallsQueue:
    """Megatron's AsyncCallsQueue whose one (persistent) caller is a `ThreadAsyncCaller`."""
    calls = AsyncCallsQueue(persistent=True)
    calls.persistent_caller = ThreadAsyncCaller()
    return calls

