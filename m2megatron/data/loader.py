"""The training loader of one data-parallel rank: batches of images + tokenized captions, resumable.

`next(loader)` returns {"images": uint8 [b, 3, S, S], not normalized (image.normalize_images does that on the
device; a CUDA tensor with DALI's mixed decoder, CPU otherwise), "text_ids": long [b, L], "text_mask": long
[b, L], "keys": [str], "captions": [str]}. Bad samples are skipped, counted (`loader.skipped()`) and logged;
each batch still has exactly b good samples.

A batch is the next b samples of the source's order that pass the caption/header checks and decode.
One background thread (`prefetch` batches ahead) runs three stages:

1. read + probe: the source's items in order; a bad caption or image header is counted and dropped;
2. decode: chunks of probed items go to the chunk decoder (`decode.build_chunk_decoder`: DALI
   pipelined, PIL worker processes, or PIL in this thread), up to its `depth` chunks in flight, and
   come back in order; an image that fails to decode is counted and dropped;
3. assemble: b good samples → stacked images, tokenized captions.

Resumability: every sample carries the source position after it and the skip counts up to it (the
probe counts snapshotted when it was read, plus the decode failures before it), so a batch carries
exactly the position and counts of its last sample, however far ahead the stages have read.
`state_dict()` returns those of the last batch *returned*: `load_state_dict(state)` on a fresh loader
continues with exactly the batch the uninterrupted loader would have returned next, with any decoder.
The position does not depend on the layout (m2megatron.data.position): `load_global_state(states)`
takes every saved DP rank's state of a run at any DP size and continues with exactly the samples of
the saved epochs that no saved rank had returned, shared out over this run's ranks.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections import deque
from typing import NamedTuple

import numpy as np
import torch

from m2megatron.data.image import FULL_BOX, Augment, ImageLimits, probe_image, to_chw_uint8
from m2megatron.data.skips import BadSample, SkipCounter

log = logging.getLogger("m2megatron.data")
STATE_VERSION = 2
STOP_WAIT_S = 30.0


class _Probed(NamedTuple):
    item: object  # sources.Item
    position: dict  # source position after this item
    skipped: dict  # probe skips up to this item


class _Ready(NamedTuple):
    item: object
    image: torch.Tensor  # [3, S, S]
    position: dict
    skipped: dict  # all skips up to this item


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted({*a, *b})}


class TrainLoader:
    """Infinite iterator of training batches for one DP rank (see the module docstring).

    `decoder` is a chunk decoder (None when the source yields pixels, e.g. synthetic scenes).
    `pin_device`: a CUDA device whose host batches are stacked into pinned memory (for to_device's
    asynchronous copy); None otherwise.
    """

    def __init__(self, source, decoder, tokenizer, micro_batch_size: int, *, augment: Augment | None = None,
                 limits: ImageLimits | None = None, prefetch: int = 2, pin_device: torch.device | None = None):
        self.source, self.decoder, self.tokenizer = source, decoder, tokenizer
        self.micro_batch_size, self.augment, self.prefetch = micro_batch_size, augment, prefetch
        self.limits = limits or ImageLimits()
        self.pin_device = pin_device
        self._position = source.start_position()
        self._counts: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # samples returned per mixture source and per "lang/<tag>"
        self.batches = 0  # batches returned so far (resumed runs include the earlier ones)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._sync_stream = None

    # -- public API ------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch == 0:
            if self._sync_stream is None:
                self._sync_stream = self._produce(self._position, self._counts, self._seen)
            try:
                batch = next(self._sync_stream)
            except BaseException:
                self._stop_producer(failed=True)
                raise
        else:
            if self._thread is None:
                self._start()
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                self._stop_producer(failed=True)
                raise batch
        self._position, self._counts, self._seen = batch.pop("_position"), batch.pop("_skipped"), batch.pop("_seen")
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        """Small JSON-able position after the last returned batch (save it in the checkpoint): the source's
        state (this rank's work and its position in it, m2megatron.data.position), skip counts and batches."""
        return {"version": getattr(self.source, "state_version", STATE_VERSION), **self.source.state(self._position),
                "skipped": dict(self._counts), "seen": dict(self._seen), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, saved by this DP rank at this DP size (from every saved rank's state at
        another DP size: `load_global_state`)."""
        self._stop_producer()  # its thread reads the source's work
        self._position = self.source.restore(state)
        self._counts, self.batches = dict(state.get("skipped", {})), int(state.get("batches", 0))
        self._seen = dict(state.get("seen", {}))

    def load_global_state(self, states: list[dict]) -> None:
        """Continue from the states of every DP rank of a checkpoint saved at any DP size (other entries,
        e.g. StageBatches' FOLLOWER_STATE, are ignored). At the same layout this rank takes its own state;
        at another one the unread rest of the saved epochs is shared out over this run's ranks
        (`position.redistribute`), so no sample is read twice or dropped. The skip counts of all saved
        ranks are summed into DP rank 0's (the sum over ranks stays the job's count)."""
        saved = self._saved_ranks(states)
        src = self.source
        if src.same_layout(saved):
            self.load_state_dict(saved[src.dp_rank])
            return
        self._stop_producer()
        self._position = src.restore_global(saved)
        counts: dict[str, int] = {}
        seen: dict[str, int] = {}
        for state in saved:
            counts, seen = _merge(counts, state.get("skipped", {})), _merge(seen, state.get("seen", {}))
        self._counts, self._seen = (counts, seen) if src.dp_rank == 0 else ({}, {})
        self.batches = max(int(state.get("batches", 0)) for state in saved)

    @staticmethod
    def _saved_ranks(states: list[dict]) -> list[dict]:
        """The state of every saved DP rank, in rank order; one state per rank."""
        by_rank: dict[int, dict] = {}
        for state in states:
            if not isinstance(state, dict) or "kind" not in state:
                continue
            rank = int(state.get("dp_rank", -1))
            if by_rank.setdefault(rank, state) != state:
                raise ValueError(f"data loader states: two different states for DP rank {rank}")
        sizes = {int(s["dp_size"]) for s in by_rank.values()}
        if len(sizes) != 1 or sorted(by_rank) != list(range(next(iter(sizes)))):
            raise ValueError(f"data loader states: expected one state for every DP rank of one DP size, got ranks "
                             f"{sorted(by_rank)} of sizes {sorted(sizes)}")
        return [by_rank[r] for r in sorted(by_rank)]

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason (skips.REASONS), as of the last returned batch."""
        return dict(self._counts)

    def samples_seen(self) -> dict[str, int]:
        """Samples returned so far per webdataset source name and per "lang/<language tag>" (part of the state,
        so cumulative over resumes; after a layout change the saved ranks' counts are summed into DP rank 0's)."""
        return dict(self._seen)

    @property
    def epoch(self) -> int:
        return self.source.epoch_of(self._position)

    @property
    def images_decoded(self) -> int:
        """Images handed to the decoder so far (0 for sources that yield pixels)."""
        return getattr(self.decoder, "images_decoded", 0)

    def close(self) -> None:
        """Stop the background thread and the decoder's threads/processes (batches prepared ahead are
        dropped; the state is unaffected, and a later next() starts them again)."""
        self._stop_producer()
        if self.decoder is not None:
            self.decoder.close()

    def _stop_producer(self, failed: bool = False) -> None:
        if self._thread is not None:
            self._stop.set()
            deadline = time.monotonic() + STOP_WAIT_S
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
                if time.monotonic() > deadline and self.decoder is not None:
                    # The thread waits on a decoder that does not answer (a hung worker): stopping the
                    # decoder wakes it with an error, which it hands over and then ends.
                    log.warning("data loader: the producer did not stop within %.0f s; stopping the decoder",
                                STOP_WAIT_S)
                    self.decoder.close()
                    failed, deadline = True, float("inf")
            self._thread = None
        self._sync_stream = None
        if self.decoder is not None:
            if failed:  # its chunks in flight may be lost (a dead worker): start afresh on the next call
                self.decoder.close()
            else:
                self.decoder.reset()

    # -- producer ----------------------------------------------------------------------------------
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        args = (self._position, self._counts, self._seen, self._queue, self._stop)
        self._thread = threading.Thread(target=self._run, args=args, name="m2-data", daemon=True)
        self._thread.start()

    def _run(self, position, counts, seen, out: queue.Queue, stop: threading.Event) -> None:
        try:
            if self.pin_device is not None:
                torch.cuda.set_device(self.pin_device)  # pinned memory belongs to this rank's GPU, not GPU 0
            for batch in self._produce(position, counts, seen):
                while not stop.is_set():
                    try:
                        out.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            out.put(exc)

    def _produce(self, position: dict, counts: dict[str, int], seen: dict[str, int]):
        probe_skips, decode_skips = SkipCounter(), SkipCounter()
        probe_skips.load(counts)
        probed = self._probed(self.source.stream(position), probe_skips)
        depth = self.decoder.depth if self.decoder is not None else 1
        chunk = self.decoder.chunk if self.decoder is not None else self.micro_batch_size
        reuses = getattr(self.decoder, "reuses_buffers", False)
        inflight: deque = deque()
        ready: deque[_Ready] = deque()
        seen = collections.Counter(seen)
        while True:
            while len(inflight) < depth:  # keep the decoder busy
                inflight.append(self._submit([next(probed) for _ in range(chunk)]))
            ready.extend(self._collect(*inflight.popleft(), decode_skips))
            while len(ready) >= self.micro_batch_size:
                yield self._batch([ready.popleft() for _ in range(self.micro_batch_size)], seen)
            if reuses:  # samples kept for the next batch point into a buffer the next submit overwrites
                ready = deque(r._replace(image=r.image.clone()) for r in ready)

    def _probed(self, stream, counter: SkipCounter):
        """Items whose caption and image header look fine, in order (the others are counted)."""
        for item, pos in stream:
            try:
                if isinstance(item, BadSample):
                    raise item
                if not item.caption.strip():
                    raise BadSample("empty_caption")
                if item.encoded is not None:
                    size = probe_image(item.encoded, self.limits)
                    if getattr(item, "filters", None) is not None:  # the source's aspect-ratio filters
                        item.filters.check_image(*size)
            except BadSample as bad:
                if item is bad:  # reported by the source; its detail says where
                    counter.add(bad.reason, bad.detail)
                else:
                    counter.add(bad.reason, item.key, bad.detail)
                continue
            yield _Probed(item, pos, counter.counts())

    def _submit(self, chunk: list[_Probed]) -> tuple[list[_Probed], bool]:
        todo = [p.item for p in chunk if p.item.pixels is None]
        if todo:
            boxes, flips = zip(*(self._augment_params(i) for i in todo))
            self.decoder.submit([i.encoded for i in todo], list(boxes), list(flips))
        return chunk, bool(todo)

    def _collect(self, chunk: list[_Probed], submitted: bool, decode_skips: SkipCounter) -> list[_Ready]:
        """The chunk's samples that decoded, in order, each with the skip counts up to it."""
        rows = iter(self.decoder.result()) if submitted else iter(())
        out, decode_counts = [], decode_skips.counts()
        for p in chunk:
            if p.item.pixels is not None:
                image = torch.from_numpy(to_chw_uint8(p.item.pixels))
            else:
                image = next(rows)
                if isinstance(image, BadSample):
                    decode_skips.add(image.reason, p.item.key, image.detail)
                    decode_counts = decode_skips.counts()
                    continue
            out.append(_Ready(p.item, image, p.position, _merge(p.skipped, decode_counts)))
        return out

    def _batch(self, samples: list[_Ready], seen: collections.Counter) -> dict:
        """Stack and tokenize `samples`; `seen` (the per-source/language counts) counts them."""
        images = [s.image for s in samples]
        out = None
        if self.pin_device is not None and images[0].device.type == "cpu":
            out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=True)
        captions = [s.item.caption for s in samples]
        ids, mask = self.tokenizer.encode(captions)
        for s in samples:
            if getattr(s.item, "source", ""):
                seen[s.item.source] += 1
                seen["lang/" + s.item.language] += 1
        return {"images": torch.stack(images, out=out), "text_ids": ids, "text_mask": mask,
                "keys": [s.item.key for s in samples], "captions": captions,
                "_position": samples[-1].position, "_skipped": samples[-1].skipped, "_seen": dict(seen)}

    def _augment_params(self, item) -> tuple[tuple[float, float, float, float], bool]:
        if self.augment is None:
            return FULL_BOX, False
        return self.augment.draw(np.random.default_rng([k & 0xFFFFFFFF for k in item.aug_key]))
