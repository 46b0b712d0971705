"""The body of one PIL decode worker process (started by `worker_pool.PilWorkerPool`).

Images come from the training loader, which has probed their headers, so they are not probed again.
Imports only numpy, PIL and the image helpers (the package __init__ is lazy), so a spawned worker starts
in a fraction of a second. A job is (number, slot, encoded images, relative crop boxes, flips); the
worker decodes each image into row j of `slot` of the shared uint8 buffer [depth, chunk, 3, S, S] (not normalized:
the trainer does that on the device)
and answers ("done", number, statuses) with None for a good image and (reason, detail) for a bad one.
Any other exception is answered ("error", number, traceback) and ends the worker.

The worker ignores SIGINT, SIGTERM and SIGUSR1: Slurm and terminals signal every process of a job,
and the trainer's own handler decides when to stop. It exits on a None job, or when its parent is gone.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import traceback

import numpy as np

from m2megatron.data.image import ImageLimits, decode_pil, preprocess_pil
from m2megatron.data.skips import BadSample

PARENT_POLL_S = 1.0


def map_buffer(path: str, shape: tuple[int, ...], create: bool = False) -> np.memmap:
    """The shared uint8 buffer backed by `path` (a file in /dev/shm), created at its full size if asked."""
    return np.memmap(path, dtype=np.uint8, mode="w+" if create else "r+", shape=shape)


def _decode_into(row: np.ndarray, data: bytes, box, flip: bool, size: int, limits: ImageLimits):
    try:
        preprocess_pil(decode_pil(data, limits, probe=False), size, box, flip, out=row,  # the loader probed it
                       normalize=False)
    except BadSample as bad:
        return bad.reason, bad.detail
    return None


def worker_main(index: int, path: str, shape: tuple[int, ...], size: int, limits: ImageLimits,
                inbox, outbox) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    buffer = map_buffer(path, shape)
    outbox.put(("ready", index, None))
    parent = multiprocessing.parent_process()
    while True:
        try:
            job = inbox.get(timeout=PARENT_POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if job is None:
            return
        number, slot, encoded, boxes, flips = job
        try:
            statuses = [_decode_into(buffer[slot, j], data, box, flip, size, limits)
                        for j, (data, box, flip) in enumerate(zip(encoded, boxes, flips))]
        except BaseException:  # noqa: BLE001 - a bug, not a bad image: reported to the parent, which raises
            outbox.put(("error", number, traceback.format_exc()))
            return
        outbox.put(("done", number, statuses))
