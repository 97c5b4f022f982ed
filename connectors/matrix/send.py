"""Sending a portal's messages exactly once, in order.

Per batch: skip what the message map already has; write an intent for the
rest before sending; send each with a deterministic txn id; record event ids
and drop intents in one transaction. A send that fails without an answer is
settled (``settle.scan``) before it is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from connectors.matrix.client import MatrixClient, MatrixRequestError, describe
from connectors.matrix.content import build_content, redaction_content
from connectors.matrix.fetch import MediaError
from connectors.matrix.ghosts import Ghosts
from connectors.matrix.media import upload_message_media
from connectors.matrix.queues import PortalQueue, RoomState, WorkItem
from connectors.matrix.rooms import Rooms
from connectors.matrix.settle import scan, settle_startup
from connectors.matrix.stats import SinkStats
from connectors.matrix.store import Intent, Mapped, SinkStore
from topics.logs import fields
from topics.records import NetworkMessage
from topics.retry import RetryExhausted, Verdict, classify

log = logging.getLogger("backflow.sink")

RECENT_LIMIT = 10_000  # message ids per room kept in memory for relations


def txn_id(room_id: str, key: str, message_id: str, part: int) -> str:
    """Deterministic per (room, portal, message, part): a retry reuses it."""
    digest = hashlib.sha256(f"{room_id}\0{key}\0{message_id}\0{part}".encode()).hexdigest()
    return f"bf{digest[:40]}"


class Unresolvable(Exception):
    """An edit, reaction or redaction whose target was never bridged to this room."""


def refused_for_good(exc: BaseException) -> bool:
    """Permanent for this command (dead-letter it), as opposed to trouble that passes.

    ``RetryExhausted`` means the homeserver (or database) stayed away for the
    whole retry budget: the command is fine, so it waits for the next round
    instead of becoming a dead letter.
    """
    return not isinstance(exc, RetryExhausted) and classify(exc) is Verdict.PERMANENT


def refusal(exc: Exception) -> str:
    """The dead-letter reason for a message the homeserver (or its input) refused."""
    if isinstance(exc, MatrixRequestError):
        return f"homeserver refused: {describe(exc)}"
    if isinstance(exc, MediaError | Unresolvable):
        return str(exc)
    return f"refused: {type(exc).__name__}: {exc}"


DeadLetter = Callable[[WorkItem, str], Awaitable[None]]


class MessageSender:
    """Sends SendMessage commands of one portal at a time (the caller serialises)."""

    def __init__(
        self,
        client: MatrixClient,
        store: SinkStore,
        ghosts: Ghosts,
        rooms: Rooms,
        stats: SinkStats,
        turns: asyncio.Semaphore,
        dead_letter: DeadLetter,
    ) -> None:
        self.client = client
        self.store = store
        self.ghosts = ghosts
        self.rooms = rooms
        self.stats = stats
        self.turns = turns  # rooms with a request in flight (taken per request)
        self.dead_letter = dead_letter

    async def send_batch(self, portal: PortalQueue, batch: list[WorkItem]) -> None:
        m0 = batch[0].command.message  # type: ignore[union-attr]
        room = await self.rooms.state(portal, m0.network, m0.portal)
        key = portal.key
        await settle_startup(self.client, self.store, self.stats, key, room)
        keys = [(i.command.message.id, i.command.message.part) for i in batch]  # type: ignore[union-attr]
        mapped = await self.store.lookup(room.room_id, key, keys)
        todo: list[tuple[WorkItem, Intent]] = []
        seen: set[tuple[str, int]] = set()
        for item, k in zip(batch, keys, strict=True):
            if k in mapped or k in seen:
                self.stats.skipped += 1
                continue
            seen.add(k)
            todo.append(
                (item, Intent(room.room_id, key, k[0], k[1], txn_id(room.room_id, key, *k)))
            )
        if not todo:
            return
        await self.store.add_intents([i for _, i in todo])
        results: list[tuple[Intent, str, int, str | None]] = []
        failed: list[Intent] = []
        try:
            for item, intent in todo:
                msg = item.command.message  # type: ignore[union-attr]
                t0 = time.perf_counter()
                try:
                    event_id, sender = await self.send_one(room, key, msg, intent)
                except Exception as exc:
                    # Refused for good (the homeserver said no, bad media, a value
                    # our database rejects such as a NUL in a display name): dead
                    # letter, the rest keeps flowing. Transient trouble propagates
                    # and the batch is retried.
                    if not refused_for_good(exc):
                        raise
                    await self.dead_letter(item, refusal(exc))
                    failed.append(intent)
                    continue
                results.append((intent, event_id, msg.ts, sender))
                self.stats.count_send(key, time.perf_counter() - t0)
                room.last_event = event_id
                if msg.part == 0 or msg.id not in room.recent:
                    room.recent[msg.id] = Mapped(event_id, msg.ts, sender)
        finally:
            # Whatever happened, make what did happen durable.
            await self.store.record(results)
            await self.store.drop_intents(failed)
        if len(room.recent) > RECENT_LIMIT:
            room.recent.clear()

    async def resolve(self, room: RoomState, key: str, message_id: str) -> Mapped | None:
        hit = room.recent.get(message_id)
        if hit is None:
            hit = await self.store.lookup_message(room.room_id, key, message_id)
        return hit

    async def send_one(
        self, room: RoomState, key: str, msg: NetworkMessage, intent: Intent
    ) -> tuple[str, str]:
        """Send one message (with its relations resolved); returns (event id, sender)."""
        c = msg.content
        ghost = await self.ghosts.ensure(
            msg.network, msg.sender.id, msg.sender.name, msg.sender.avatar_url
        )
        await self.rooms.ensure_member(room, ghost)
        stop = room.last_event

        async def settle() -> str | None:
            # The send failed without an answer: did it land anyway?
            found = await scan(self.client, room.room_id, key, stop)
            hit = found.get((msg.id, msg.part))
            if hit is None:
                return None
            self.stats.settled += 1
            log.info(
                "portal %s: in-doubt send of %s found in the room",
                key,
                msg.id,
                extra=fields(key, msg.id, room.room_id),
            )
            return hit[0]

        target: Mapped | None = None
        if c.kind in ("edit", "reaction", "redaction"):
            assert c.target is not None
            target = await self.resolve(room, key, c.target)
            if target is None:
                raise Unresolvable(f"{c.kind} target {c.target!r} is not bridged in {room.room_id}")
        if c.kind == "redaction":
            assert target is not None
            as_user = ghost if target.sender == ghost else self.client.bot
            event_id = await self.client.redact(
                room.room_id,
                target.event_id,
                intent.txn_id,
                redaction_content(msg),
                as_user=as_user,
                settle=settle,
                slot=self.turns,
            )
            return event_id, as_user
        reply = thread = None
        if msg.reply_to:
            hit = await self.resolve(room, key, msg.reply_to)
            reply = hit.event_id if hit else None  # unknown target: send without the relation
        if msg.thread:
            hit = await self.resolve(room, key, msg.thread)
            thread = hit.event_id if hit else None
        mxc = size = None
        if c.kind == "media":
            mxc, size = await upload_message_media(self.client, msg, self.turns)
        event_type, content = build_content(
            msg,
            mxc=mxc,
            media_size=size,
            reply_event=reply,
            thread_root=thread,
            target_event=target.event_id if target else None,
        )
        event_id = await self.client.send(
            room.room_id,
            event_type,
            content,
            intent.txn_id,
            as_user=ghost,
            ts=msg.ts,
            settle=settle,
            slot=self.turns,
        )
        return event_id, ghost
