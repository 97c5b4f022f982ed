"""Work items and the per-room queues they wait in.

Each portal has one queue drained by one worker task, so a room's commands
run strictly in order. What a queue may hold is bounded per room
(``ROOM_BUFFER``): a backed-up room's portal is parked (reread.py), so one big
portal cannot keep the others of its partition waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from connectors.matrix.store import Mapped
from topics.records import CreateRoom, SendMessage

BATCH = 100  # commands per worker turn (one DB round trip)
ROOM_BUFFER = 1000  # commands buffered per room before its portal is parked


@dataclass(slots=True)
class WorkItem:
    """One consumed command and where it came from (for commits and dead letters)."""

    tp: TopicPartition | None
    offset: int
    raw: bytes
    command: CreateRoom | SendMessage
    reread: bool = False  # handed over by a parked portal's reader (reread.py)

    @property
    def source(self) -> str | None:
        return f"{self.tp.topic}[{self.tp.partition}]@{self.offset}" if self.tp else None


@dataclass
class RoomState:
    """What this process knows about a portal's room."""

    room_id: str
    alias: str
    joined: set[str] | None = None  # None: not loaded yet in this process
    last_event: str | None = None  # newest event we know we put in the room
    settled_startup: bool = False
    recent: dict[str, Mapped] = field(default_factory=dict)  # message id -> first part


class PortalQueue:
    """A portal's pending commands and the worker task draining them."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.queue: deque[WorkItem] = deque()
        self.task: asyncio.Task[None] | None = None
        self.room: RoomState | None = None

    def push(self, item: WorkItem) -> None:
        self.queue.append(item)

    def take_batch(self) -> list[WorkItem]:
        """A CreateRoom alone, or up to BATCH consecutive sends."""
        first = self.queue.popleft()
        batch = [first]
        if not isinstance(first.command, CreateRoom):
            while (
                self.queue
                and len(batch) < BATCH
                and isinstance(self.queue[0].command, SendMessage)
            ):
                batch.append(self.queue.popleft())
        return batch

    def put_back(self, batch: list[WorkItem]) -> None:
        self.queue.extendleft(reversed(batch))
