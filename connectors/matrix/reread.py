"""Fairness inside one partition: a backed-up portal is parked, then re-read on its own.

A portal's commands sit as one block in their partition. Pausing that partition
while one room is backed up would keep every portal behind it waiting for the
whole block. Instead, once a room holds ``ROOM_BUFFER`` commands, the portal is
*parked* on that partition: the main consumer skips its further records and
keeps feeding the other portals, while the commit position stops at the parked
portal's first command not yet handed to its queue. When the room has drained
to half, a reader of its own (a group-less consumer assigned to that one
partition) reads on from there, feeding only that portal, and leaves off again
when the room is full. Once it has caught up with the main consumer, the portal
is unparked and the main consumer feeds it again.

Nothing is lost across a crash or a rebalance: the committed position never
passes a parked portal's first unfinished command, so the next owner reads it
again (and the message map skips what was already sent). The commands the
reader hands over are tracked by the parked portal's own ``OffsetTracker``
(they arrive below the main consumer's position, out of its order).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from connectors.matrix.offsets import OffsetTracker
from topics.logs import fields

log = logging.getLogger("backflow.sink.reread")

READ_RECORDS = 500  # records per fetch of a reader
# Consecutive empty fetches (the broker away, a leader moving) before a reader
# ends its turn; the portal stays parked and a new reader starts after a pause.
EMPTY_FETCHES = 100


@dataclass
class Parked:
    """One portal parked on one partition."""

    key: str
    tp: TopicPartition
    next_offset: int  # the first offset the reader has not looked at
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    active: bool = True  # the main consumer skips this portal's records on tp
    reader: asyncio.Task[None] | None = None

    def floor(self) -> int | None:
        """The lowest offset this portal still needs, or None when it needs nothing."""
        first = self.tracker.first_pending(self.tp)
        if first is not None:
            return first
        return self.next_offset if self.active else None

    @property
    def reading(self) -> bool:
        return self.reader is not None and not self.reader.done()


def commit_position(
    main: int | None, main_first_pending: int | None, floors: list[int]
) -> int | None:
    """A partition's committable position with parked portals on it (pure).

    Every offset below the lowest unfinished one (the main consumer's first
    pending command, a parked portal's floor) is finished: records are consumed
    in order from the committed position. With nothing unfinished, the main
    tracker's position stands.
    """
    unfinished = [o for o in (main_first_pending, *floors) if o is not None]
    if unfinished:
        return min(unfinished)
    return main


async def read_portal(
    parked: Parked,
    consumer: AIOKafkaConsumer,
    seen: Callable[[], int],
    room_full: Callable[[], bool],
    hand_over: Callable[[ConsumerRecord], None],
) -> str:
    """Read ``parked.tp`` from ``parked.next_offset``, handing the portal's records over.

    Returns why it stopped: ``"full"`` (the room is full again; the worker
    starts a new reader when it has drained), ``"caught_up"`` (it reached the
    main consumer's position, ``seen()``, and unparked the portal; between the
    check and unparking there is no ``await``, so no record falls between the
    reader and the main consumer) or ``"idle"`` (no records for a while: the
    portal stays parked, its floor holding the commit back).
    """
    tp = parked.tp
    consumer.assign([tp])
    consumer.seek(tp, parked.next_offset)
    empty = 0
    while True:
        if parked.next_offset >= seen():
            parked.active = False  # caught up: the main consumer feeds it from here
            return "caught_up"
        batch = await consumer.getmany(tp, timeout_ms=200, max_records=READ_RECORDS)
        records = batch.get(tp, [])
        if not records:
            empty += 1
            if empty >= EMPTY_FETCHES:
                log.warning(
                    "portal %s: no records re-reading %s from offset %d; trying again",
                    parked.key,
                    tp,
                    parked.next_offset,
                    extra=fields(parked.key),
                )
                return "idle"
            continue
        empty = 0
        for record in records:
            if record.offset < parked.next_offset:
                continue
            if record.offset >= seen():
                break  # the main consumer has not got here: it will feed the rest
            if room_full():
                return "full"  # next_offset stays here; a later reader goes on from it
            if record.offset > parked.next_offset and parked.next_offset != 0:
                # Offsets can have gaps (transaction markers), but records the
                # retention deleted are gone for good: say so loudly.
                log.warning(
                    "portal %s: %s offsets %d..%d not in the log any more",
                    parked.key,
                    tp,
                    parked.next_offset,
                    record.offset - 1,
                    extra=fields(parked.key),
                )
            hand_over(record)
            parked.next_offset = record.offset + 1
