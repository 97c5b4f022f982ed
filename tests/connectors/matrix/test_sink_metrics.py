"""The sink process's /metrics and JSON logs, checked against what Synapse has."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from connectors.matrix.registration import load_registration
from connectors.matrix.store import SinkStore
from tests.helpers import free_port, scrape_until, stage_env
from tests.sink_helpers import (
    BASE_TS,
    NET,
    bodies,
    client_for,
    create,
    message,
    publish,
    room_messages,
    sends,
    text,
)
from topics.records import Content, SendMessage
from topics.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def lag(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("backflow_sink_consumer_lag{"))


async def test_sink_metrics_follow_the_messages_and_logs_are_json(
    stack: Settings, tmp_path: Path
) -> None:
    portal = f"Chat/{uuid.uuid4().hex[:8]}"
    key = f"{NET}:{portal}"
    port = free_port()
    env = stage_env(
        stack,
        PYTHONPATH=str(ROOT),
        BACKFLOW_METRICS_SINK_PORT=str(port),
        BACKFLOW_LOG_FORMAT="json",
    )
    log_path = tmp_path / "sink.log"
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "connectors.matrix.sink_main"],
            env=env,
            cwd=stack.state_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        before = await scrape_until(port, lambda m: "backflow_sink_sent_total" in m)
        assert before["backflow_sink_sent_total"] == 0
        assert before["backflow_sink_send_seconds_count"] == 0

        first = [text(portal, f"m{i}", "alice", BASE_TS + i, f"hi {i}") for i in range(8)]
        await publish(stack, [create(portal, [("alice", "Alice")]), *sends(first)])
        mid = await scrape_until(port, lambda m: m["backflow_sink_sent_total"] == 8 and lag(m) == 0)
        assert mid["backflow_sink_commands_total"] == 9
        assert mid["backflow_sink_rooms_created_total"] == 1
        assert mid["backflow_sink_send_seconds_count"] == 8
        assert mid["backflow_sink_send_seconds_sum"] > 0
        assert mid["backflow_sink_dead_lettered_total"] == 0
        assert any(k.startswith("backflow_sink_consumer_lag{") for k in mid)

        more = [text(portal, f"n{i}", "alice", BASE_TS + 100 + i, f"more {i}") for i in range(5)]
        orphan = message(
            portal,
            "orphan",
            "alice",
            BASE_TS + 200,
            Content(kind="reaction", target="nope", key="x"),
        )
        more_cmds = [SendMessage(message=m, seq=9 + i) for i, m in enumerate([*more, orphan])]
        await publish(stack, more_cmds)
        after = await scrape_until(
            port,
            lambda m: (
                m["backflow_sink_sent_total"] == 13 and m["backflow_sink_dead_lettered_total"] == 1
            ),
        )
        assert after["backflow_sink_send_seconds_count"] == 13

        store = await SinkStore.open(stack.database.url)
        try:
            room = await store.room(key)
        finally:
            await store.close()
        assert room is not None
        async with client_for(stack) as client:
            read_back = bodies(await room_messages(client, room))
        assert len(read_back) == after["backflow_sink_sent_total"]
        assert read_back == [f"hi {i}" for i in range(8)] + [f"more {i}" for i in range(5)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    log = log_path.read_text()
    token = load_registration(stack.appservice.registration).as_token
    assert token not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    created = [x for x in lines if "created room" in x["msg"]]
    assert created and created[0]["portal"] == key and created[0]["room_id"] == room
    dead = [x for x in lines if x["msg"].startswith("dead letter")]
    assert [(x["portal"], x["message_id"]) for x in dead] == [(key, "orphan")], dead
    # Only our formatter writes log lines: nothing else but the final summary print.
    others = [line for line in log.splitlines() if line and not line.startswith("{")]
    assert all(line.startswith("sink: ") for line in others), others
