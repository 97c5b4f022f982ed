"""The demo's story (backflow/demo_story.py) on a small sample, checked against Synapse.

Two formats (JSONL, a WhatsApp .txt), ``max_initial_conversations`` 2 holding
the least recent JSONL portal until a live record releases it, a later export
caught up into an existing room, one portal rebuilt into a fresh room with the
old one tombstoned. The summary the demo prints must be what the homeserver
has: every room is read back.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson

from backflow.demo import SAMPLES
from backflow.demo_story import Sample, Story, run_story, table
from connectors.matrix.content import SOURCE_KEY
from connectors.matrix.store import SinkStore
from tests.helpers import stage_env
from tests.sink_helpers import client_for
from topics.settings import Settings

T0 = 1_700_000_000_000


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def _msg(net: str, portal: str, mid: str, ts: int, history: bool = True) -> dict:
    return {
        "type": "message",
        "network": net,
        "portal": portal,
        "id": mid,
        "history": history,
        "sender": {"id": "ann", "name": "Ann"},
        "ts": ts,
        "content": {"kind": "text", "body": f"body {mid}"},
    }


async def _room_events(settings: Settings, room_id: str) -> list[dict]:
    async with client_for(settings) as client:
        return await client.timeline(room_id)


def _ids(events: list[dict]) -> list[str]:
    return [
        e["content"][SOURCE_KEY]["id"]
        for e in events
        if e["type"] == "m.room.message" and SOURCE_KEY in e.get("content", {})
    ]


async def test_demo_story_summary_matches_synapse(stack: Settings, tmp_path: Path) -> None:
    net = f"demot{uuid.uuid4().hex[:6]}"
    wa_portal = f"book-{uuid.uuid4().hex[:6]}"
    # a: newest (catch-up later), b: rebuilt, c: least recent (held, then live).
    history = [{"type": "portal", "network": net, "portal": p, "name": p} for p in "abc"]
    expected = {
        "a": [f"a{i}" for i in range(3)],
        "b": [f"b{i}" for i in range(4)],
        "c": [f"c{i}" for i in range(2)],
    }
    newest = {"a": 900_000, "b": 600_000, "c": 300_000}
    for p, ids in expected.items():
        for i, mid in enumerate(ids):
            history.append(_msg(net, p, mid, T0 + newest[p] - (len(ids) - i) * 1000))
    later = [_msg(net, "a", "a2", T0 + 899_000), _msg(net, "a", "a-later", T0 + 950_000)]
    live = [_msg(net, "c", "c-live", T0 + 990_000, history=False)]
    story = Story(
        history=(
            Sample("jsonl", _write(tmp_path / "chats.jsonl", history)),
            Sample("whatsapp", SAMPLES / "WhatsApp Chat - Book Club.txt", {"portal": wa_portal}),
        ),
        later=(Sample("jsonl", _write(tmp_path / "later.jsonl", later)),),
        live=(Sample("jsonl", _write(tmp_path / "live.jsonl", live), live=True),),
        rebuild=f"{net}:b",
        max_initial_conversations=2,
    )
    out: list[str] = []
    rows = await run_story(stack, story, stage_env(stack), out.append, tmp_path / "logs", 300)
    text = "\n".join(out + table(rows))
    print(text)

    assert f"held by max_initial_conversations=2: {net}:c" in text
    by_portal = {r.portal: r for r in rows}
    wa_key = f"whatsapp:{wa_portal}"
    assert set(by_portal) == {f"{net}:a", f"{net}:b", f"{net}:c", wa_key}

    store = await SinkStore.open(stack.database.url, size=1)
    try:
        rooms = {r["portal_key"]: r for r in await store.rooms()}
        [rebuild] = await store.rebuilds(f"{net}:b")
    finally:
        await store.close()
    expected["a"].append("a-later")  # caught up into the existing room, a2 once
    expected["c"].append("c-live")  # released by the live record, after its history
    for p, ids in expected.items():
        row = by_portal[f"{net}:{p}"]
        room = rooms[row.portal]
        assert row.room == room["alias"] and row.network == net
        events = await _room_events(stack, room["room_id"])
        assert _ids(events) == ids, p
        # The summary's "sent" is what the room shows: messages (no reactions here).
        assert row.sent == len(ids), (p, row)
        assert row.held == 0 and row.state.startswith("live"), row
    assert by_portal[f"{net}:b"].state == "live (rebuilt)"
    assert rebuild["new_room"] == rooms[f"{net}:b"]["room_id"] != rebuild["old_room"]
    old = await _room_events(stack, rebuild["old_room"])
    [tombstone] = [e for e in old if e["type"] == "m.room.tombstone"]
    assert tombstone["content"]["replacement_room"] == rebuild["new_room"]

    wa = by_portal[wa_key]
    wa_events = await _room_events(stack, rooms[wa_key]["room_id"])
    bodies = [e["content"].get("body") for e in wa_events if e["type"] == "m.room.message"]
    assert "Welcome!" in bodies and "midnight" in bodies
    assert wa.sent == len(bodies) and wa.state == "live" and wa.held == 0
