"""`backflow import jsonl` through the real CLI and the real broker."""

from __future__ import annotations

import orjson

from tests.helpers import backflow_cli, read_topic
from topics.records import HistoryComplete, NetworkMessage, PortalInfo, SyncComplete

TS = 1_700_000_000_000


def line(i: int, **over) -> bytes:
    m = {
        "type": "message",
        "network": "demo",
        "portal": "jsonl-chat",
        "id": f"j{i}",
        "sender": {"id": "alice"},
        "ts": TS + i * 1000,
        "content": {"kind": "text", "body": f"message {i}"},
    }
    m.update(over)
    return orjson.dumps(m)


async def test_bad_lines_are_reported_dead_lettered_and_skipped(stack, tmp_path):
    portal = orjson.dumps(
        {"type": "portal", "network": "demo", "portal": "jsonl-chat", "name": "J"}
    )
    lines = [
        portal,
        line(1),
        b"{this is not json",
        line(2, ts="1700000000000"),
        line(3, sender=None),
        line(4),
        b"",
        line(5, content={"kind": "text"}),
        line(6),
        # 10 MB on one line: rejected without being held, the file goes on.
        b'{"type": "message", "body": "' + b"x" * 10_000_000 + b'"}',
        line(7),
    ]
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    result = backflow_cli(stack, "import", "jsonl", str(path))
    assert result.returncode == 0, result.stderr
    assert "history.jsonl:3: invalid JSON" in result.stderr
    assert "history.jsonl:4: field 'ts': expected an integer, got string" in result.stderr
    assert "history.jsonl:5: field 'sender': missing" in result.stderr
    assert "history.jsonl:8: field 'content.body': missing" in result.stderr
    assert "history.jsonl:10: line over 900000 bytes: not read" in result.stderr
    assert "4 messages in 1 portals published" in result.stdout
    assert "5 rejected" in result.stdout

    history = await read_topic(stack, stack.catalog.history, expect=7)
    # One partition holds the portal in publication order, the marker last.
    portal_records = [r for r in history if getattr(r, "key", "") == "demo:jsonl-chat"]
    assert [type(r) for r in portal_records] == [PortalInfo] + [NetworkMessage] * 4 + [
        HistoryComplete
    ]
    assert [m.id for m in portal_records[1:5]] == ["j1", "j4", "j6", "j7"]
    assert portal_records[5].count == 4
    (sync,) = [r for r in history if isinstance(r, SyncComplete)]
    assert sync.portals == 1 and sync.sync == portal_records[5].sync

    letters = await read_topic(stack, stack.catalog.dead_letters, expect=5)
    assert sorted(d.source for d in letters) == [f"history.jsonl:{n}" for n in (10, 3, 4, 5, 8)]
    assert all(d.stage == "import" for d in letters)
    by_source = {d.source: d for d in letters}
    assert by_source["history.jsonl:3"].original == "{this is not json\n"  # as read
    assert "field 'content.body'" in by_source["history.jsonl:8"].reason
    # A rejected line that names a usable portal is dead-lettered under its key.
    assert by_source["history.jsonl:4"].key == "demo:jsonl-chat"
    assert by_source["history.jsonl:3"].key is None


async def test_missing_file_and_unreachable_broker_are_one_line(stack, tmp_path):
    result = backflow_cli(stack, "import", "jsonl", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"backflow: error: {tmp_path / 'nope.jsonl'}: no such file or directory"
    ]
    path = tmp_path / "one.jsonl"
    path.write_bytes(line(1) + b"\n")
    dead = stack.with_overrides({"kafka.bootstrap": "127.0.0.1:1"})
    result = backflow_cli(dead, "import", "jsonl", str(path))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("backflow: error: cannot reach Kafka at 127.0.0.1:1")


async def test_unknown_format_lists_installed(stack, tmp_path):
    result = backflow_cli(stack, "import", "--list")
    assert result.returncode == 0 and "jsonl" in result.stdout
    result = backflow_cli(stack, "import", "nope", str(tmp_path))
    assert result.returncode != 0 and "unknown format 'nope'" in result.stderr


def test_progress_line_shows_bar_counts_rate_and_eta():
    from backflow.cli.main import progress_line
    from connectors.publish import ImportSummary

    summary = ImportSummary("jsonl", portals=3, messages=1200, rejected=2, seconds=4.0)
    line = progress_line(summary, (250, 1000))
    assert line.startswith("[######------------------]  25% 1,200 messages, 3 portals")
    assert "2 rejected, 300 msg/s" in line and line.endswith("0:12 left")
    assert progress_line(summary, None).startswith("1,200 messages")


def test_sources_report_their_read_position(tmp_path):
    from connectors.sources.jsonl import JsonlSource

    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(50)))
    source = JsonlSource(path)
    items = source.read()
    next(items)
    done, total = source.progress()
    assert total == path.stat().st_size and 0 < done <= total
    list(items)
