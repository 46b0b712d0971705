"""The data position: an epoch's global order, each data-parallel rank's share of it, and how the unread
rest of the epoch is shared out again at another data-parallel size.

**Units and the global order.** A source has N units: samples (synthetic, jsonl) or shards (webdataset).
Epoch e's global order is a seeded permutation of the units, a function of (seed, epoch) only; slot s
of epoch e is unit perm_e[s]. A unit's records (one per sample; a shard's records in its block-shuffled
order) depend on (seed, epoch, unit) only. Nothing in the order depends on the layout.

**Work.** `Segment(epoch, start, stop, step, first)` = the slots range(start, stop, step) of the epoch's
order, its first unit read from record `first` on. A rank's `Work` is its plan (segments, only after a
layout change) followed by its standard share of every epoch from `then` on: rank r of P takes the
slots range(r, P·q, P) with q = N // P, the same count on every rank. The last N − P·q slots of the
order are left out of that epoch; DP rank 0 emits them as counted skips when it starts the epoch. With
`share_remainder` (a mixture's lanes) rank r takes range(r, N, P) instead and nothing is left out.

**Position** `{"epoch", "segment", "unit", "record"}`: next to read is record `record` of the `unit`-th
unit of work segment `segment` (plan segments first, then one standard segment per epoch from `then`).
While a segment's left-out slots are being counted, `"left_out": n` says that its first n are (a reader
of a mixture can stop between two of them: m2megatron.data.mixture).

**Redistribution** (`redistribute`): from every saved rank's (work, position), the unread rest of every
epoch the saved layout had entered, in epoch order, is cut into P' contiguous pieces of equal unit count
(±1); new rank r' reads piece r' as its plan, then standard epochs from the first epoch no saved rank
had entered. A partly read unit continues at its record, so nothing is read twice or dropped. The rest
is at most a few segments per saved rank and epoch, so a plan stays small at any scale.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Slots range(start, stop, step) of `epoch`'s global order; the first one read from record `first` on."""

    epoch: int
    start: int
    stop: int
    step: int = 1
    first: int = 0

    @property
    def slots(self) -> range:
        return range(self.start, self.stop, self.step)

    def __len__(self) -> int:
        return len(self.slots)

    def start_record(self, unit: int, record: int) -> int:
        """Where reading unit `unit` starts when the position says `record`."""
        return max(record, self.first) if unit == 0 else record

    def rest(self, unit: int, record: int) -> Segment | None:
        """What is left from record `record` of unit `unit` on (None when nothing is)."""
        slots = self.slots[unit:]
        if not slots:
            return None
        return Segment(self.epoch, slots.start, slots.stop, slots.step, self.start_record(unit, record))

    def split(self, num_units: int) -> tuple[Segment, Segment]:
        """(the first `num_units` units, the rest)."""
        head, tail = self.slots[:num_units], self.slots[num_units:]
        return (Segment(self.epoch, head.start, head.stop, head.step, self.first),
                Segment(self.epoch, tail.start, tail.stop, tail.step, 0))

    def to_list(self) -> list[int]:
        return [self.epoch, self.start, self.stop, self.step, self.first]

    @classmethod
    def from_list(cls, values) -> Segment:
        epoch, start, stop, step, first = (int(v) for v in values)
        return cls(epoch, start, stop, step, first)


@dataclass(frozen=True)
class Work:
    """What one data-parallel rank reads: `plan`, then its standard share of every epoch from `then` on."""

    num_units: int
    dp_rank: int
    dp_size: int
    plan: tuple[Segment, ...] = ()
    then: int = 0
    share_remainder: bool = False
    """Standard shares take all N slots (the first N mod P ranks one more) instead of leaving the last N mod P
    out: a mixture's lanes (m2megatron.data.mixture), whose readers need no equal counts."""

    def segment(self, index: int) -> Segment:
        if index < len(self.plan):
            return self.plan[index]
        stop = self.num_units if self.share_remainder else self.dp_size * (self.num_units // self.dp_size)
        return Segment(self.then + index - len(self.plan), self.dp_rank, stop, self.dp_size)

    def left_out(self, index: int) -> range:
        """Slots of its epoch that segment `index` leaves out, emitted as counted skips when it starts: the
        order's last N mod P slots, on DP rank 0's standard segments; empty elsewhere."""
        if index < len(self.plan) or self.dp_rank != 0 or self.share_remainder:
            return range(0)
        return range(self.dp_size * (self.num_units // self.dp_size), self.num_units)

    def position(self, index: int = 0, unit: int = 0, record: int = 0) -> dict:
        return {"epoch": self.segment(index).epoch, "segment": index, "unit": unit, "record": record}

    def horizon(self, position: dict) -> int:
        """The last epoch this rank's layout has entered, as far as this rank knows: its current one, or the
        last one its plan holds."""
        return max(self.segment(int(position["segment"])).epoch, self.then - 1)

    def unread(self, position: dict, through_epoch: int) -> list[Segment]:
        """Everything of epochs <= `through_epoch` this rank has not read from `position` on: the rest of its
        current segment, its later plan segments, its later standard segments (with the left-out slots of
        each one not started: they become ordinary work)."""
        index, unit, record = int(position["segment"]), int(position["unit"]), int(position["record"])
        emitted = int(position.get("left_out", 0))  # left-out slots of the current segment already counted
        out: list[Segment] = []
        while index < len(self.plan) or self.segment(index).epoch <= through_epoch:
            seg = self.segment(index)
            tail = self.left_out(index)[emitted:]
            if (unit, record) == (0, 0) and tail:
                out.append(Segment(seg.epoch, tail.start, tail.stop))
            rest = seg.rest(unit, record)
            if rest is not None:
                out.append(rest)
            index, unit, record, emitted = index + 1, 0, 0, 0
        return out

    def to_state(self) -> dict:
        return {"plan": [s.to_list() for s in self.plan], "then": self.then}

    @classmethod
    def from_state(cls, num_units: int, dp_rank: int, dp_size: int, state: dict, share_remainder: bool = False
                   ) -> Work:
        plan = tuple(Segment.from_list(s) for s in state.get("plan", ()))
        return cls(num_units, dp_rank, dp_size, plan, int(state.get("then", 0)), share_remainder)


def redistribute(saved: list[tuple[Work, dict]], dp_size: int) -> tuple[list[tuple[Segment, ...]], int]:
    """Share the unread rest of the saved ranks' epochs (`saved`: (work, position) of every saved rank, in
    DP-rank order) over `dp_size` new ranks: (each new rank's plan, the epoch they all continue with)."""
    through = max(work.horizon(pos) for work, pos in saved)
    rest = [seg for work, pos in saved for seg in work.unread(pos, through)]
    rest.sort(key=lambda seg: seg.epoch)  # stable: saved-rank order within an epoch
    total = sum(map(len, rest))
    todo, plans = deque(rest), []
    for rank in range(dp_size):
        want, plan = total // dp_size + (rank < total % dp_size), []
        while want:
            seg = todo.popleft()
            if len(seg) > want:
                seg, back = seg.split(want)
                todo.appendleft(back)
            if len(seg):
                plan.append(seg)
            want -= len(seg)
        plans.append(tuple(plan))
    return plans, through + 1


def units_left(plan: tuple[Segment, ...]) -> int:
    return sum(map(len, plan))
