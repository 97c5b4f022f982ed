"""Hostile records the codec accepts, and hostile URLs, all the way into Synapse.

The corpus cases that are valid records (NUL in a body or a display name,
terminal escapes and bidi overrides in ids, names and topics) and media and
avatar URLs that point at loopback, private, link-local and IPv6-mapped
addresses, or redirect there, are imported from JSONL and run through a real
worker and sink into the session's Synapse. Each is either delivered or
dead-lettered with one reason (documented in docs/reliability.md); no
internal address is ever requested; and the neighbour portal's messages are
read back from the room: every one, once, in order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from connectors.matrix.content import SOURCE_KEY
from connectors.publish import publish_source
from connectors.sources.jsonl import JsonlSource
from tests.helpers import portal_timeline, read_topic, stage_env, stop_stages
from tests.hostile.corpus import ACCEPTED, BASE_TS, NETWORK, message, portal_record
from topics.records import DeadLetter
from topics.settings import Settings

# Addresses a record may name that the sink must never fetch from.
INTERNAL = [
    "http://127.0.0.1:{port}/secret",
    "http://[::1]:{port}/secret",
    "http://[::ffff:127.0.0.1]:{port}/secret",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/secret",
    "http://0.0.0.0:{port}/secret",
    "http://localhost:{port}/to-internal",  # the allowed host, redirecting to loopback
]


def loopback_name() -> list[str]:
    """A host name (not allow-listed) that resolves to loopback here, if there is one."""
    name = socket.gethostname()
    try:
        address = socket.getaddrinfo(name, 80)[0][4][0]
    except OSError:
        return []
    return [f"http://{name}:{{port}}/secret"] if ipaddress.ip_address(address).is_loopback else []


class MediaHost:
    """A local HTTP server: what a record's URL would reach; counts every request."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits[request.path] += 1
            if request.path == "/to-internal":
                raise web.HTTPFound(f"http://127.0.0.1:{self.port}/secret")
            if request.path == "/ok.png":
                return web.Response(body=b"\x89PNG fine", content_type="image/png")
            return web.Response(body=b"INTERNAL SECRET", content_type="image/png")

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def media_host() -> AsyncIterator[MediaHost]:
    host = MediaHost()
    await host.start()
    yield host
    await host.close()


def media(mid: str, portal: str, url: str, ts: int) -> dict:
    content = {"kind": "media", "media_type": "image", "url": url, "filename": "x.png"}
    return message(mid, portal, ts=ts, content=content)


def start(settings: Settings, logs: Path, allow: str) -> list[subprocess.Popen]:
    env = stage_env(settings, BACKFLOW_SINK_MEDIA_ALLOW=allow, BACKFLOW_SINK_MEDIA_TIMEOUT_S="3")
    children = []
    for stage in ("worker", "sink"):
        out = open(logs / f"{stage}.log", "wb")  # noqa: SIM115 - the child owns it
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "backflow.cli", stage],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    return children


async def test_accepted_hostile_records_and_internal_urls_end_to_end(
    stack: Settings, tmp_path: Path, media_host: MediaHost
) -> None:
    network = f"{NETWORK}{uuid.uuid4().hex[:6]}"
    neighbours = "neighbours"
    lines: list[bytes] = [orjson.dumps({**portal_record(neighbours), "network": network})]
    expected: list[str] = []
    ts = BASE_TS

    def neighbour() -> None:
        nonlocal ts
        ts += 1
        mid = f"n{len(expected)}"
        lines.append(orjson.dumps({**message(mid, neighbours, ts=ts), "network": network}))
        expected.append(f"body of {mid}")

    # Each accepted case with its own message id (unless the id is the case).
    for i, case in enumerate(ACCEPTED):
        neighbour()
        raw = case.raw.replace(b'"network":"hostile"', f'"network":"{network}"'.encode())
        lines.append(raw.replace(b'"id":"m"', f'"id":"m{i}"'.encode()))
    urls = [u.format(port=media_host.port) for u in INTERNAL + loopback_name()]
    for i, url in enumerate(urls):
        neighbour()
        ts += 1
        lines.append(orjson.dumps({**media(f"u{i}", neighbours, url, ts), "network": network}))
        avatar = {"id": f"spy{i}", "name": "Spy", "avatar_url": url}
        ts += 1
        lines.append(
            orjson.dumps({**message(f"a{i}", neighbours, ts=ts, sender=avatar), "network": network})
        )
        expected.append(f"body of a{i}")  # delivered; the avatar is refused, not fetched
    neighbour()
    ok = f"http://localhost:{media_host.port}/ok.png"
    ts += 1
    lines.append(orjson.dumps({**media("ok", neighbours, ok, ts), "network": network}))
    expected.append("x.png")  # an allowed host's media is fetched and uploaded
    neighbour()
    path = tmp_path / "e2e.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    summary = await publish_source(JsonlSource(path), stack)
    assert summary.rejected == 0
    children = start(stack, tmp_path, allow="localhost")
    try:
        deadline = time.monotonic() + 180
        bodies: list[str] = []
        while time.monotonic() < deadline:
            events = await portal_timeline(stack, network, neighbours) or []
            bodies = [e["content"].get("body") for e in events]
            if len(bodies) >= len(expected):
                break
            for child in children:
                assert child.poll() is None, (tmp_path / "sink.log").read_text()[-3000:]
            await asyncio.sleep(1)
        await asyncio.sleep(2)  # anything sent twice would show now
        events = await portal_timeline(stack, network, neighbours) or []
        bodies = [e["content"].get("body") for e in events]
        letters = await read_topic(stack, stack.catalog.dead_letters)
    finally:
        stop_stages(children)

    assert bodies == expected
    assert media_host.hits["/secret"] == 0 and media_host.hits["/ok.png"] == 1
    sink_letters = [d for d in letters if isinstance(d, DeadLetter) and d.stage == "sink"]
    refused = {d.original for d in sink_letters if "not a public address" in d.reason}
    for i in range(len(urls)):
        assert any(f'"u{i}"' in o for o in refused), (i, [d.reason for d in sink_letters])
    # The accepted corpus cases: each delivered to its room once, or one dead letter.
    for i, case in enumerate(ACCEPTED):
        record = orjson.loads(lines[2 + 2 * i])
        if record["type"] != "message":
            continue
        timeline = await portal_timeline(stack, network, record["portal"]) or []
        delivered = [e for e in timeline if e["content"][SOURCE_KEY]["id"] == record["id"]]
        dead = [d for d in sink_letters if _command_id(d.original) == record["id"]]
        assert len(delivered) + len(dead) == 1, (case.name, delivered, dead)
        outcome = "delivered" if delivered else f"dead letter: {dead[0].reason[:120]}"
        print(f"{case.name}: {outcome}")


def _command_id(original: str) -> str | None:
    try:
        return orjson.loads(original)["message"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
