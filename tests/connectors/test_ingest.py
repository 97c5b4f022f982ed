"""Live ingest endpoint against the real (embedded) broker."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from connectors.ingest import serve
from tests.helpers import free_port, read_topic

TS = 1_700_000_000_000


def message(i: int, **over) -> dict:
    m = {
        "type": "message",
        "network": "demo",
        "portal": "live-chat",
        "id": f"live-{i}",
        "sender": {"id": "alice"},
        "ts": TS + i,
        "content": {"kind": "text", "body": f"live {i}"},
    }
    m.update(over)
    return m


async def test_ingest_accepts_rejects_and_publishes(stack):
    port = free_port()
    settings = stack.with_overrides(
        {
            "ingest.listen": f"127.0.0.1:{port}",
            "ingest.token": "s3cret",
            "ingest.max_body_bytes": 4096,
        }
    )
    ready = asyncio.Event()
    server = asyncio.create_task(serve(settings, ready))
    await asyncio.wait_for(ready.wait(), 30)
    url = f"http://127.0.0.1:{port}/v1/records"
    auth = {"Authorization": "Bearer s3cret"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=orjson.dumps(message(1))) as r:
                assert r.status == 401
            async with http.post(url, data=orjson.dumps(message(1)), headers=auth) as r:
                assert r.status == 200, await r.text()
                assert await r.json() == {"accepted": 1}
            batch = {"records": [message(2), message(3, history=True)]}
            async with http.post(url, data=orjson.dumps(batch), headers=auth) as r:
                assert (await r.json()) == {"accepted": 2}
            bad = [message(4), message(5, ts="noon")]
            async with http.post(url, data=orjson.dumps(bad), headers=auth) as r:
                assert r.status == 400
                body = await r.json()
                assert body["field"] == "records[1].ts"
                assert "expected an integer" in body["reason"]
            async with http.post(url, data=b"x" * 5000, headers=auth) as r:
                assert r.status == 413
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)

    live = await read_topic(settings, settings.catalog.live, expect=2)
    history = await read_topic(settings, settings.catalog.history, expect=1)
    assert sorted(r.id for r in live) == ["live-1", "live-2"]
    assert all(not r.history for r in live)
    assert [r.id for r in history] == ["live-3"]
    letters = await read_topic(settings, settings.catalog.dead_letters, expect=1)
    assert letters[0].stage == "ingest" and "records[1]" in letters[0].reason
    assert "live-4" in letters[0].original  # nothing of the bad batch was published
    assert not [r for r in live + history if r.id in ("live-4", "live-5")]
