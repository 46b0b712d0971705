"""The training loader of one data-parallel rank: batches of images + tokenized captions, resumable.

`next(loader)` returns {"images": float32 [b, 3, S, S] in [−1, 1] (a CUDA tensor with DALI's mixed
decoder, CPU otherwise), "text_ids": long [b, L], "text_mask": long [b, L], "keys": [str], "captions":
[str]}. Bad samples are skipped, counted (`loader.skipped()`) and logged; each batch still has exactly
b good samples.

Resumability: one background thread prepares batches strictly in order; each batch carries the source
position and skip counts as of its last sample. `state_dict()` returns those of the last batch
*returned*, so batches prepared ahead are not lost: `load_state_dict(state)` on a fresh loader continues
with exactly the batch the uninterrupted loader would have returned next.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np
import torch

from m2megatron.data.image import FULL_BOX, Augment, ImageLimits, normalize_uint8, probe_image
from m2megatron.data.skips import BadSample, SkipCounter

log = logging.getLogger("m2megatron.data")
STATE_VERSION = 1
_END = object()


class TrainLoader:
    """Infinite iterator of training batches for one DP rank (see the module docstring)."""

    def __init__(self, source, decoder, tokenizer, micro_batch_size: int, *, augment: Augment | None = None,
                 limits: ImageLimits | None = None, prefetch: int = 2):
        self.source, self.decoder, self.tokenizer = source, decoder, tokenizer
        self.micro_batch_size, self.augment, self.prefetch = micro_batch_size, augment, prefetch
        self.limits = limits or ImageLimits()
        self._position = source.start_position()
        self._counts: dict[str, int] = {}
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
                self._sync_stream = self._produce(self._position, self._counts)
            batch = next(self._sync_stream)
        else:
            if self._thread is None:
                self._start()
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                self._thread = None
                raise batch
        self._position, self._counts = batch.pop("_position"), batch.pop("_skipped")
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        """Small JSON-able position after the last returned batch (save it in the checkpoint)."""
        return {"version": STATE_VERSION, "kind": self.source.kind, "seed": self.source.seed,
                "dp_rank": self.source.dp_rank, "dp_size": self.source.dp_size,
                "position": dict(self._position), "skipped": dict(self._counts), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. At another DP size the saved epoch restarts (the order depends on it)."""
        if state.get("version") != STATE_VERSION or state.get("kind") != self.source.kind:
            raise ValueError(f"data loader state: expected version {STATE_VERSION} of a {self.source.kind!r} "
                             f"loader, got version {state.get('version')} of {state.get('kind')!r}")
        if state["seed"] != self.source.seed:
            raise ValueError(f"data loader state: saved with seed {state['seed']}, this run has {self.source.seed}")
        self.close()
        position = dict(state["position"])
        if state["dp_size"] != self.source.dp_size:
            log.warning("data loader: saved at DP size %d, now %d: restarting epoch %d of the data order",
                        state["dp_size"], self.source.dp_size, position["epoch"])
            position = self.source.start_position(int(position["epoch"]))
        self._position, self._counts = position, dict(state.get("skipped", {}))
        self.batches = int(state.get("batches", 0))

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason (skips.REASONS), as of the last returned batch."""
        return dict(self._counts)

    @property
    def epoch(self) -> int:
        return int(self._position["epoch"])

    def close(self) -> None:
        """Stop the background thread (batches prepared ahead are dropped; the state is unaffected)."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread = None
        self._sync_stream = None

    # -- producer ----------------------------------------------------------------------------------
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        args = (self._position, self._counts, self._queue, self._stop)
        self._thread = threading.Thread(target=self._run, args=args, name="m2-data", daemon=True)
        self._thread.start()

    def _run(self, position, counts, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self._produce(position, counts):
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

    def _produce(self, position: dict, counts: dict[str, int]):
        counter = SkipCounter()
        counter.load(counts)
        stream = self.source.stream(position)
        while True:
            items, pos = [], position
            while len(items) < self.micro_batch_size:
                todo, pos = self._take(stream, counter, self.micro_batch_size - len(items), pos)
                items.extend(self._decode(todo, counter))
            ids, mask = self.tokenizer.encode([it[0].caption for it in items])
            yield {"images": torch.stack([it[1] for it in items]), "text_ids": ids, "text_mask": mask,
                   "keys": [it[0].key for it in items], "captions": [it[0].caption for it in items],
                   "_position": pos, "_skipped": counter.counts()}

    def _take(self, stream, counter: SkipCounter, n: int, pos: dict):
        """The next n items whose caption and image header look fine (the others are counted)."""
        items = []
        while len(items) < n:
            item, pos = next(stream)
            try:
                if isinstance(item, BadSample):
                    raise item
                if not item.caption.strip():
                    raise BadSample("empty_caption")
                if item.encoded is not None:
                    probe_image(item.encoded, self.limits)
                items.append(item)
            except BadSample as bad:
                if item is bad:  # reported by the source; its detail says where
                    counter.add(bad.reason, bad.detail)
                else:
                    counter.add(bad.reason, item.key, bad.detail)
        return items, pos

    def _decode(self, items, counter: SkipCounter):
        """[(item, image tensor [3, S, S])] for the items that decode, in order."""
        images: list[torch.Tensor | None] = [
            torch.from_numpy(normalize_uint8(i.pixels)) if i.pixels is not None else None for i in items]
        todo = [k for k, i in enumerate(items) if i.pixels is None]
        if todo:
            boxes, flips = zip(*(self._augment_params(items[k]) for k in todo))
            decoded, bad = self.decoder.decode([items[k].encoded for k in todo], list(boxes), list(flips))
            good = iter(decoded)
            for j, k in enumerate(todo):
                if j in bad:
                    counter.add(bad[j].reason, items[k].key, bad[j].detail)
                else:
                    images[k] = next(good)
        return [(i, img) for i, img in zip(items, images) if img is not None]

    def _augment_params(self, item) -> tuple[tuple[float, float, float, float], bool]:
        if self.augment is None:
            return FULL_BOX, False
        return self.augment.draw(np.random.default_rng([k & 0xFFFFFFFF for k in item.aug_key]))
