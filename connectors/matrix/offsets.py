"""Which offsets are safe to commit: never past a command whose effect is not durable."""

from __future__ import annotations

from collections import deque

from aiokafka import TopicPartition


class OffsetTracker:
    """Per partition: the offsets in flight; the commit position stops at the first unfinished.

    Commands of one partition finish out of order (they belong to different
    rooms, each with its own queue), so a finished offset only moves the
    position once every earlier one has finished too.
    """

    def __init__(self) -> None:
        self._order: dict[TopicPartition, deque[int]] = {}
        self._inflight: dict[TopicPartition, set[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # committable position
        self.pending = 0

    def add(self, tp: TopicPartition, offset: int) -> None:
        self._order.setdefault(tp, deque()).append(offset)
        self._inflight.setdefault(tp, set()).add(offset)
        self._done.setdefault(tp, set())
        self.pending += 1

    def done(self, tp: TopicPartition, offset: int) -> None:
        order = self._order.get(tp)
        inflight = self._inflight.get(tp)
        if order is None or inflight is None or offset not in inflight:
            return  # revoked meanwhile (and maybe assigned again): not ours to count
        inflight.discard(offset)
        done = self._done[tp]
        done.add(offset)
        self.pending -= 1
        while order and order[0] in done:
            first = order.popleft()
            done.discard(first)
            self._next[tp] = first + 1

    def first_pending(self, tp: TopicPartition) -> int | None:
        """The lowest unfinished offset of ``tp`` (None when nothing is in flight)."""
        order = self._order.get(tp)
        return order[0] if order else None

    def pending_in(self, tps: set[TopicPartition]) -> int:
        return sum(len(self._order.get(tp, ())) for tp in tps)

    def partitions(self) -> set[TopicPartition]:
        return set(self._order)

    def positions(self) -> dict[TopicPartition, int]:
        """Per partition, the next offset to consume after a restart."""
        return dict(self._next)

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            order = self._order.pop(tp, None)
            self.pending -= len(order or ())
            self._inflight.pop(tp, None)
            self._done.pop(tp, None)
            self._next.pop(tp, None)
