"""Live ingest: an HTTP endpoint where a running bridge posts canonical records.

``POST /v1/records`` with ``Authorization: Bearer <ingest.token>`` and a body
that is one record object, an array of them, or ``{"records": [...]}``.
Messages default to live (``history: false``). The reply comes only after the
broker acknowledged every record, so a 200 means durable. Every record of a
request is validated before any is published: one bad record answers 400
naming its index, field and reason, publishes nothing, and leaves a dead
letter for the operator. If the broker fails while a valid batch is being
published, the answer is 503 and the client sends the batch again: records
are identified by (portal, message id, part), so the pipeline drops what the
first try already published (Kafka without transactions cannot take back a
half-published batch; redelivery plus dedup is what makes it whole).

Hostile clients: the body is read whole but never beyond
``ingest.max_body_bytes`` (413), a header that is not valid UTF-8 is just a
wrong token (401), and a connection must finish its request headers within
``ingest.header_timeout_s`` seconds or is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

import orjson
from aiohttp import web

from connectors.publish import Publisher, check_record
from topics import bus
from topics.codec import RecordError, from_dict
from topics.deadletter import Stage
from topics.logs import add_secret
from topics.metrics import counter, serve_metrics
from topics.records import NetworkMessage, PortalInfo
from topics.settings import Settings, SettingsError

log = logging.getLogger("backflow.ingest")

# Seconds a keep-alive connection may stay idle between requests.
KEEPALIVE_TIMEOUT = 30.0
# What the endpoint counts (its /metrics reads these): records accepted, requests
# refused as invalid (dead-lettered), unauthorized, or answered 503.
COUNTS = web.AppKey("counts", dict)


class HeaderDeadline(asyncio.Protocol):
    """Closes a connection whose first request headers do not arrive in time.

    aiohttp waits for request headers without a deadline, so a client that
    never finishes them would hold a connection forever. This wraps aiohttp's
    protocol (``runner.server()``: public API) and only watches for the blank
    line that ends the headers; everything is passed through unchanged. Idle
    keep-alive connections are closed by aiohttp after KEEPALIVE_TIMEOUT.
    """

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self.inner = inner
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.timeout, transport.close)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            seen = self.tail + data
            if b"\r\n\r\n" in seen:
                self.timer.cancel()
                self.timer = None
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


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
        try:
            # The size too, before anything is published: a record over the
            # broker's limit refused mid-batch would answer 503 forever.
            check_record(record, decoded=True)
        except RecordError as exc:
            raise RecordError(f"records[{index}]", exc.reason) from None
        records.append(record)
    return records


class BodyTooLarge(Exception):
    pass


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, however many TCP segments it came in; at most ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)


def make_app(settings: Settings, publisher: Publisher) -> web.Application:
    token = settings.ingest.token
    if not token:
        raise SettingsError("set ingest.token (BACKFLOW_INGEST_TOKEN) before starting ingest")
    add_secret(token)
    expected = f"Bearer {token}".encode()
    counts = {"accepted": 0, "rejected": 0, "unauthorized": 0, "unavailable": 0}
    # One request at a time per process keeps the publisher's ack window simple;
    # a request's records are acknowledged together before the reply.
    lock = asyncio.Lock()

    async def post_records(request: web.Request) -> web.Response:
        # Any byte a client sends is only ever a wrong token, never a 500.
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            counts["unauthorized"] += 1
            return _error(401, "M_UNKNOWN_TOKEN", "missing or wrong bearer token")
        limit = settings.ingest.max_body_bytes
        too_large = _error(413, "M_TOO_LARGE", f"body over {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            return too_large
        try:
            raw = await read_body(request, limit)
        except BodyTooLarge:
            return too_large
        try:
            records = parse_body(raw)
        except RecordError as exc:
            async with lock:
                await publisher.reject(f"http:{request.remote}{request.path}", str(exc), raw)
                await publisher.flush()
            counts["rejected"] += 1
            return _error(400, "M_BAD_JSON", str(exc), field=exc.field, reason=exc.reason)
        try:
            async with lock:
                for record in records:
                    await publisher.record(record)
                await publisher.flush()
        except Exception as exc:  # noqa: BLE001 - the broker: the client retries the batch
            log.warning("publishing a batch of %d failed: %r", len(records), exc)
            counts["unavailable"] += 1
            return _error(
                503,
                "M_UNAVAILABLE",
                "the broker did not take the batch; send it again (records already "
                "published are deduplicated by message id)",
            )
        counts["accepted"] += len(records)
        return web.json_response({"accepted": len(records)})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=settings.ingest.max_body_bytes + 1)
    app.router.add_post("/v1/records", post_records)
    app.router.add_get("/health", health)
    app[COUNTS] = counts
    return app


def serve_ingest_metrics(settings: Settings, counts: dict[str, int]) -> Any:
    """``/metrics`` on ``metrics.ingest_port`` (None when 0: off)."""

    def collect() -> Any:
        p = "backflow_ingest_"
        yield counter(p + "records_accepted", "Records published", counts["accepted"])
        yield counter(p + "requests_rejected", "Invalid requests dead-lettered", counts["rejected"])
        yield counter(p + "requests_unauthorized", "Wrong or missing token", counts["unauthorized"])
        yield counter(p + "requests_unavailable", "Batches answered 503", counts["unavailable"])

    return serve_metrics(settings.metrics.host, settings.metrics.ingest_port, collect)


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run the endpoint until cancelled."""
    host, _, port = settings.ingest.listen.rpartition(":")
    producer = bus.producer(settings)
    await bus.start(producer, settings)
    runner: web.AppRunner | None = None
    listener: asyncio.Server | None = None
    metrics: Any = None
    try:
        app = make_app(settings, Publisher(settings, producer, Stage.INGEST))
        metrics = serve_ingest_metrics(settings, app[COUNTS])
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT)
        await runner.setup()
        server = runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            lambda: HeaderDeadline(server(), settings.ingest.header_timeout_s),
            host or "127.0.0.1",
            int(port),
        )
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        if listener is not None:
            listener.close()
        if runner is not None:
            await runner.cleanup()
        await producer.stop()
