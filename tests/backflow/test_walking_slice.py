"""The walking slice: JSONL file -> broker -> pipeline -> sink -> Synapse room.

Three portals, shuffled input, real broker, real Postgres, real Synapse; every
claim is read back from the homeserver.
"""

from __future__ import annotations

import asyncio
import random
import time

import orjson

from tests.helpers import backflow_cli, portal_timeline, start_stages, stop_stages

T0 = 1_650_000_000_000


async def test_three_shuffled_portals_land_in_order(stack, tmp_path):
    rng = random.Random(4)
    portals = {
        f"slice-{name}-{rng.randrange(10**6)}": n for name, n in [("a", 12), ("b", 7), ("c", 20)]
    }
    lines = []
    expected: dict[str, list[tuple[str, int]]] = {}
    for portal, count in portals.items():
        lines.append({"type": "portal", "network": "demo", "portal": portal, "name": portal})
        # Irregular gaps, two messages sharing one timestamp (order of the input wins).
        ts = [T0]
        for _ in range(count - 1):
            ts.append(ts[-1] + rng.randrange(1, 90_000))
        ts[3] = ts[2]
        msgs = [
            {
                "type": "message",
                "network": "demo",
                "portal": portal,
                "id": f"{portal}-{i}",
                "sender": {"id": ["alice", "bob", "Carol M."][i % 3], "name": f"User {i % 3}"},
                "ts": ts[i],
                "content": {"kind": "text", "body": f"{portal} message {i}"},
            }
            for i in range(count)
        ]
        expected[portal] = [(m["content"]["body"], m["ts"]) for m in msgs]
        # Shuffle, but keep the two equal-timestamp messages in input order.
        tied = msgs[2:4]
        rest = msgs[:2] + msgs[4:]
        rng.shuffle(rest)
        cut = rng.randrange(len(rest))
        lines += rest[:cut] + tied + rest[cut:]
    path = tmp_path / "slice.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    result = backflow_cli(stack, "import", "jsonl", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{sum(portals.values())} messages in 3 portals published" in result.stdout

    children = start_stages(stack)
    try:
        got: dict[str, list[tuple[str, int]]] = {}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            for portal in portals:
                events = await portal_timeline(stack, "demo", portal) or []
                got[portal] = [(e["content"]["body"], e["origin_server_ts"]) for e in events]
            if all(len(got[p]) >= n for p, n in portals.items()):
                break
            assert all(c.poll() is None for c in children), "a stage exited early"
            await asyncio.sleep(1)
        # A moment more: anything sent twice would show up now.
        await asyncio.sleep(2)
        for portal in portals:
            events = await portal_timeline(stack, "demo", portal) or []
            got[portal] = [(e["content"]["body"], e["origin_server_ts"]) for e in events]
    finally:
        stop_stages(children)

    for portal in portals:
        assert got[portal] == expected[portal], portal
