"""One hop of the ring exchange: send tensors to the next rank of the loss group, receive from the previous.

Every hop is one `batch_isend_irecv` of matched pairs (this rank's sends to `next`, its receives from
`prev`): on NCCL the pair becomes one group call, which cannot deadlock even when prev == next
(G = 2); on gloo the sends and receives are posted asynchronously. Every rank of the group issues the
same sequence of hops, so messages between two peers match in order on both backends. Peers are global
ranks (dist.get_global_rank), as P2POp expects. The hop returns at once; the caller computes on the
tensors in hand and calls `wait()` before reading what it receives or reusing what it sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

BLOCK_TAG = 1
"""Tag of the blocks travelling around the ring (a rank's image and text rows; in backward its row state)."""


@dataclass(frozen=True)
class RingPeers:
    group: dist.ProcessGroup | None
    """The loss group; None for a group of one."""
    size: int
    """G: ranks in the ring."""
    rank: int
    """This rank's index in the group."""
    next: int
    """Global rank this rank sends to (group index rank + 1 mod G)."""
    prev: int
    """Global rank this rank receives from (group index rank − 1 mod G)."""

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> RingPeers:
        if group is None or dist.get_world_size(group) == 1:
            me = dist.get_rank() if dist.is_initialized() else 0
            return cls(group=group, size=1, rank=0, next=me, prev=me)
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return cls(group=group, size=size, rank=rank, next=dist.get_global_rank(group, (rank + 1) % size),
                   prev=dist.get_global_rank(group, (rank - 1) % size))

    def owner(self, step: int) -> int:
        """Group index of the rank whose block this rank holds at ring step `step` (blocks move to `next`)."""
        return (self.rank - step) % self.size


class Hop:
    """Sends and receives of one hop in flight."""

    def __init__(self, works: list, received: Sequence[Tensor], sent: Sequence[Tensor]):
        self._works = works
        self.received = tuple(received)
        self._sent = tuple(sent)  # kept alive until the sends are done

    def wait(self) -> tuple[Tensor, ...]:
        """Block until every send and receive of the hop is done; returns the received tensors."""
        for work in self._works:
            work.wait()
        self._works, self._sent = [], ()
        return self.received


def start_hop(peers: RingPeers, send: Sequence[Tensor], recv: Sequence[Tensor], tag: int) -> Hop:
    """Post `send` → peers.next and `recv` ← peers.prev (contiguous tensors on the runtime device)."""
    ops = [dist.P2POp(dist.isend, tensor, peers.next, peers.group, tag) for tensor in send]
    ops += [dist.P2POp(dist.irecv, tensor, peers.prev, peers.group, tag) for tensor in recv]
    return Hop(dist.batch_isend_irecv(ops), recv, send)
