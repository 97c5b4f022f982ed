"""Helpers for the sink tests: publish commands, read rooms back from Synapse."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from connectors.matrix.client import MatrixClient
from connectors.matrix.registration import load_registration
from topics import bus
from topics.records import Content, CreateRoom, Member, NetworkMessage, Record, Sender, SendMessage
from topics.settings import Settings

BASE_TS = 1_600_000_000_000
NET = "testnet"


def create(
    portal: str,
    members: Iterable[tuple[str, str]] = (),
    name: str | None = None,
    topic: str | None = None,
) -> CreateRoom:
    return CreateRoom(
        network=NET,
        portal=portal,
        name=name or f"Room {portal}",
        topic=topic,
        members=tuple(Member(id=i, name=n) for i, n in members),
    )


def message(
    portal: str,
    mid: str,
    sender: str,
    ts: int,
    content: Content,
    *,
    name: str | None = None,
    part: int = 0,
    reply_to: str | None = None,
    thread: str | None = None,
) -> NetworkMessage:
    return NetworkMessage(
        network=NET,
        portal=portal,
        id=mid,
        sender=Sender(id=sender, name=name or sender.title()),
        ts=ts,
        content=content,
        part=part,
        reply_to=reply_to,
        thread=thread,
    )


def text(portal: str, mid: str, sender: str, ts: int, body: str, **kw: Any) -> NetworkMessage:
    html = kw.pop("html", None)
    return message(portal, mid, sender, ts, Content(kind="text", body=body, html=html), **kw)


def sends(messages: Iterable[NetworkMessage]) -> list[SendMessage]:
    return [SendMessage(message=m, seq=i + 1) for i, m in enumerate(messages)]


async def publish(settings: Settings, records: Iterable[Record]) -> int:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        return await bus.send_all(producer, settings.catalog.matrix_commands, list(records))
    finally:
        await producer.stop()


async def publish_raw(settings: Settings, key: str, values: list[bytes]) -> None:
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    try:
        futures = [
            await producer.send(settings.catalog.matrix_commands, v, key=key.encode())
            for v in values
        ]
        for f in futures:
            await f
    finally:
        await producer.stop()


def client_for(settings: Settings) -> MatrixClient:
    reg = load_registration(settings.appservice.registration)
    assert settings.homeserver.url and settings.homeserver.server_name
    return MatrixClient(
        settings.homeserver.url,
        reg.as_token,
        settings.homeserver.server_name,
        reg.sender_localpart,
        max_retry_delay=2.0,
    )


async def room_messages(client: MatrixClient, room_id: str) -> list[dict[str, Any]]:
    """m.room.message / m.reaction / m.room.redaction events, oldest first."""
    events = await client.timeline(room_id)
    return [e for e in events if e["type"] in ("m.room.message", "m.reaction", "m.room.redaction")]


def bodies(events: list[dict[str, Any]]) -> list[str]:
    return [e["content"].get("body") for e in events if e["type"] == "m.room.message"]
