"""Live ingest: an HTTP endpoint where a running bridge posts canonical records.

``POST /v1/records`` with ``Authorization: Bearer <ingest.token>`` and a body
that is one record object, an array of them, or ``{"records": [...]}``.
Messages default to live (``history: false``). The reply comes only after the
broker acknowledged every record, so a 200 means durable. A request is all
or nothing: one bad record answers 400 naming its index, field and reason,
publishes nothing, and leaves a dead letter for the operator.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import orjson
from aiohttp import web

from connectors.publish import Publisher
from topics import bus
from topics.codec import RecordError, from_dict
from topics.deadletter import Stage
from topics.records import NetworkMessage, PortalInfo
from topics.settings import Settings, SettingsError


def _error(status: int, errcode: str, message: str, **extra: Any) -> web.Response:
    body = {"errcode": errcode, "error": message, **extra}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def parse_body(raw: bytes) -> list[NetworkMessage | PortalInfo]:
    """Decode a request body into validated records; RecordError names index and field."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError("", f"invalid JSON: {exc}") from None
    if isinstance(data, dict) and "records" in data:
        data = data["records"]
    items = data if isinstance(data, list) else [data]
    records: list[NetworkMessage | PortalInfo] = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "message":
            item = {"history": False, **item}
        try:
            record = from_dict(item)
        except RecordError as exc:
            raise RecordError(f"records[{index}].{exc.field}".rstrip("."), exc.reason) from None
        if not isinstance(record, NetworkMessage | PortalInfo):
            raise RecordError(
                f"records[{index}].type", f"{record.TYPE!r} records are not accepted here"
            )
        records.append(record)
    return records


def make_app(settings: Settings, publisher: Publisher) -> web.Application:
    token = settings.ingest.token
    if not token:
        raise SettingsError("set ingest.token (BACKFLOW_INGEST_TOKEN) before starting ingest")
    expected = f"Bearer {token}".encode()
    # One request at a time per process keeps the publisher's ack window simple;
    # a request's records are acknowledged together before the reply.
    lock = asyncio.Lock()

    async def post_records(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _error(401, "M_UNKNOWN_TOKEN", "missing or wrong bearer token")
        limit = settings.ingest.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, "M_TOO_LARGE", f"body over {limit} bytes")
        raw = await request.content.read(limit + 1)
        if len(raw) > limit:
            return _error(413, "M_TOO_LARGE", f"body over {limit} bytes")
        try:
            records = parse_body(raw)
        except RecordError as exc:
            async with lock:
                await publisher.reject(f"http:{request.remote}{request.path}", str(exc), raw)
                await publisher.flush()
            return _error(400, "M_BAD_JSON", str(exc), field=exc.field, reason=exc.reason)
        async with lock:
            for record in records:
                await publisher.record(record)
            await publisher.flush()
        return web.json_response({"accepted": len(records)})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=settings.ingest.max_body_bytes + 1)
    app.router.add_post("/v1/records", post_records)
    app.router.add_get("/health", health)
    return app


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run the endpoint until cancelled."""
    host, _, port = settings.ingest.listen.rpartition(":")
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    runner: web.AppRunner | None = None
    try:
        app = make_app(settings, Publisher(settings, producer, Stage.INGEST))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        await producer.stop()
