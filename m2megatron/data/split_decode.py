"""Split decoding over a tensor-parallel group (`DataConfig.tp_decode = "split"`).

The reading rank (TP rank 0) runs the loader; its chunk decoder is `SplitChunks`. For each chunk it
broadcasts over the TP group a header (images, bytes), the per-image metadata (byte length, relative
crop box, flip) and the encoded bytes; every TP rank then decodes its contiguous 1/TP slice with its
own batch decoder (PIL or DALI) and the slices are all-gathered, with a status code per image (0 =
decoded, else 1 + the index of its skip reason). The other TP ranks of the first stage run `serve()`
until the reader's end header (0 images) and keep the decoded images of every round in order: both
sides then see the same stream of good images, which the loader cuts into batches of b.

All tensors handed to torch.distributed live on the runtime device; host tensors get there through
`m2megatron.parallel.device.to_device`. Every rank of the group calls the same collectives in the
same order: header, metadata, bytes (if any), images, statuses.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from m2megatron.data.skips import REASONS, BadSample
from m2megatron.parallel.device import to_device

_REASON_LIST = list(REASONS)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class SliceExchange:
    """The collective part shared by the reader and the other TP ranks of the first stage."""

    def __init__(self, local, group, src: int, device: torch.device, size: int):
        self.local, self.group, self.src, self.device, self.size = local, group, src, device, size
        self.tp_size, self.tp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.images_decoded = 0

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, src=self.src, group=self.group)
        return tensor

    def send_header(self, num_images: int, num_bytes: int) -> None:
        header = to_device({"h": torch.tensor([num_images, num_bytes], dtype=torch.long)}, self.device)["h"]
        self._broadcast(header)

    def receive_header(self) -> tuple[int, int]:
        header = self._broadcast(torch.empty(2, dtype=torch.long, device=self.device))
        n, total = header.tolist()
        return int(n), int(total)

    def send_chunk(self, encoded: list[bytes], boxes, flips) -> None:
        meta = torch.tensor([[len(e), *b, float(f)] for e, b, f in zip(encoded, boxes, flips)], dtype=torch.float64)
        payload = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)
        moved = to_device({"meta": meta, "payload": payload}, self.device)
        self._broadcast(moved["meta"])
        self._broadcast(moved["payload"])

    def receive_chunk(self, n: int, total: int) -> tuple[list[bytes], list, list[bool]]:
        meta = self._broadcast(torch.empty(n, 6, dtype=torch.float64, device=self.device)).cpu()
        payload = self._broadcast(torch.empty(total, dtype=torch.uint8, device=self.device)).cpu().numpy().tobytes()
        ends = np.cumsum(meta[:, 0].numpy().astype(np.int64))
        starts = np.concatenate([[0], ends[:-1]])
        encoded = [payload[s:e] for s, e in zip(starts, ends)]
        boxes = [tuple(float(v) for v in row[1:5]) for row in meta.tolist()]
        return encoded, boxes, [bool(row[5]) for row in meta.tolist()]

    def decode_and_gather(self, encoded: list[bytes], boxes, flips) -> list[torch.Tensor | BadSample]:
        """Decode this rank's slice, all-gather every slice: per image its [3, S, S] row or a BadSample."""
        n = len(encoded)
        per = math.ceil(n / self.tp_size)
        lo, hi = min(n, self.tp_rank * per), min(n, (self.tp_rank + 1) * per)
        mine = torch.zeros(per, 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        status = torch.zeros(per, dtype=torch.long)
        if hi > lo:
            images, bad = self.local.decode(encoded[lo:hi], boxes[lo:hi], flips[lo:hi])
            self.images_decoded += hi - lo
            good = [j for j in range(hi - lo) if j not in bad]
            if good:
                mine[torch.tensor(good, device=self.device)] = to_device({"x": images}, self.device)["x"]
            for j, exc in bad.items():
                status[j] = 1 + _REASON_LIST.index(exc.reason)
        gathered = torch.empty(self.tp_size * per, 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        _all_gather(gathered, mine, group=self.group)
        codes = torch.empty(self.tp_size * per, dtype=torch.long, device=self.device)
        _all_gather(codes, to_device({"s": status}, self.device)["s"], group=self.group)
        codes_host = codes.tolist()
        return [gathered[j] if codes_host[j] == 0 else
                BadSample(_REASON_LIST[codes_host[j] - 1], f"decoded on tensor-parallel rank {j // per}")
                for j in range(n)]


class SplitChunks:
    """The reading rank's chunk decoder in split mode: one chunk at a time, decoded by the whole TP group."""

    depth = 1
    name = "split"

    def __init__(self, exchange: SliceExchange, chunk: int):
        self.exchange, self.chunk, self.device = exchange, chunk, exchange.device
        self._pending = None

    @property
    def images_decoded(self) -> int:
        return self.exchange.images_decoded

    def submit(self, encoded: list[bytes], boxes, flips) -> None:
        self._pending = (list(encoded), list(boxes), list(flips))

    def result(self) -> list[torch.Tensor | BadSample]:
        encoded, boxes, flips = self._pending
        self._pending = None
        self.exchange.send_header(len(encoded), sum(map(len, encoded)))
        self.exchange.send_chunk(encoded, boxes, flips)
        return self.exchange.decode_and_gather(encoded, boxes, flips)

    def finish_step(self) -> None:
        """Tell the other TP ranks that this step's batches are complete."""
        self.exchange.send_header(0, 0)

    def reset(self) -> None:
        self._pending = None

    def close(self) -> None:
        self.reset()
        self.exchange.local.close()


class SplitFollower:
    """A first-stage TP rank other than the reader: decodes its slices, keeps the good images in order."""

    def __init__(self, exchange: SliceExchange):
        self.exchange = exchange
        self._ready: deque[torch.Tensor] = deque()

    @property
    def images_decoded(self) -> int:
        return self.exchange.images_decoded

    def serve_step(self) -> None:
        """Take part in the reader's decode rounds until its end-of-step header."""
        while True:
            n, total = self.exchange.receive_header()
            if n == 0:
                return
            rows = self.exchange.decode_and_gather(*self.exchange.receive_chunk(n, total))
            self._ready.extend(r for r in rows if not isinstance(r, BadSample))

    def take(self, num_batches: int, batch: int) -> list[torch.Tensor]:
        """The next num_batches stacked batches [batch, 3, S, S] of good images (what the reader's loader cut)."""
        if len(self._ready) < num_batches * batch:
            raise RuntimeError(f"split decode: {len(self._ready)} images received, {num_batches * batch} needed "
                               "(the reading rank's loader and this rank disagree)")
        return [torch.stack([self._ready.popleft() for _ in range(batch)]) for _ in range(num_batches)]

    def reset(self) -> None:
        self._ready.clear()

    def close(self) -> None:
        self.reset()
        self.exchange.local.close()
