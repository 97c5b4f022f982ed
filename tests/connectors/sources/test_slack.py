"""Slack export parsing: portals, mrkdwn to HTML, threads, reactions, files, damage."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from connectors.conformance import by_id, messages, run
from connectors.source import Rejected, SourceError
from connectors.sources.slack import SlackSource, ts_ms
from connectors.sources.slack_mrkdwn import Mrkdwn, emoji
from tests.helpers import SAMPLES as SAMPLES_DIR
from tests.helpers import traced_peak
from topics.records import Content, Member, NetworkMessage, PortalInfo, Sender

SAMPLES = SAMPLES_DIR / "slack"
ALICE = Sender("U01ALICE", "alice")
BOB = Sender("U02BOB", "Bob Builder")


def zip_tree(src: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, prefix + f.relative_to(src).as_posix())
    return dest


@pytest.fixture
def export_zip(tmp_path: Path) -> Path:
    return zip_tree(SAMPLES, tmp_path / "Acme Slack export.zip")


def read(path: Path, **options: str) -> tuple[list, list[Rejected], SlackSource]:
    return run(SlackSource, path, **options)  # type: ignore[return-value]


def test_portals_in_order_with_members_and_topic(export_zip: Path) -> None:
    records, _, _ = read(export_zip)
    portals = [r for r in records if isinstance(r, PortalInfo)]
    assert portals == [
        PortalInfo(
            "slack",
            "C01GENERAL",
            name="general",
            topic="Company-wide & news (https://example.com)",
            members=(Member("U01ALICE", "alice"), Member("U02BOB", "Bob Builder")),
        ),
        PortalInfo("slack", "C02EMPTY", name="empty"),
        PortalInfo(
            "slack",
            "D0ABDM",
            name="alice, Bob Builder",
            members=(Member("U01ALICE", "alice"), Member("U02BOB", "Bob Builder")),
        ),
    ]
    # Each portal's info comes before its messages.
    seen: set[str] = set()
    for r in records:
        if isinstance(r, PortalInfo):
            seen.add(r.portal)
        else:
            assert r.portal in seen


def test_messages_exact(export_zip: Path) -> None:
    records, rejected, source = read(export_zip)
    msgs = by_id(records)
    assert msgs[("1699999000.000100", 0)].content == Content(
        kind="notice", body="@Bob Builder has joined the channel"
    )
    hello = msgs[("1700000000.123456", 0)]
    assert hello.sender == ALICE
    assert hello.ts == 1_700_000_000_123
    assert hello.thread is None and hello.reply_to is None
    assert hello.content.body == (
        "Hello team, please read this code <now> & see the doc "
        "(https://example.com/a?b=1&c=2) cc @Bob Builder in #general"
    )
    assert hello.content.html == (
        "Hello <strong>team</strong>, <em>please</em> read <del>this</del> <code>code</code> "
        '&lt;now&gt; &amp; see <a href="https://example.com/a?b=1&amp;c=2">the doc</a> '
        "cc @Bob Builder in #general"
    )
    reply = msgs[("1700000100.000200", 0)]
    assert reply.sender == BOB
    assert reply.thread == reply.reply_to == "1700000000.123456"
    assert reply.content.body == "Reply in thread\nx = 1 < 2\ny = *not bold*"
    assert reply.content.html == (
        "Reply in thread<br><pre><code>x = 1 &lt; 2\ny = *not bold*</code></pre>"
    )
    assert msgs[("1700000300.000300", 0)].content == Content(kind="text", body="see attached")
    # Exports hold no file bytes and the URL needs a Slack token: a link survives.
    assert msgs[("1700000300.000300", 1)].content == Content(
        kind="text",
        body="📎 A cat: https://files.slack.com/files-pri/T0-F01/cat.png",
        html='📎 <a href="https://files.slack.com/files-pri/T0-F01/cat.png">A cat</a>',
    )
    assert ("1700000300.000300", 2) not in msgs  # the tombstoned file
    bot = msgs[("1700000400.000400", 0)]
    assert bot.sender == Sender("B01", "deploybot")
    assert bot.content.body == "Deploy finished"
    assert ("1700000500.000500", 0) not in msgs  # tombstone message skipped
    assert msgs[("1700050000.000000", 0)].content == Content(kind="emote", body="waves 👋")
    pdf = msgs[("1700050001.000000", 0)].content
    assert pdf.kind == "text" and "report.pdf" in pdf.body
    assert msgs[("1700001000.000000", 0)].portal == "D0ABDM"
    assert [r.where for r in rejected] == ["general/2023-11-14.json[6]"]
    assert source.stats == {"messages": 8, "reactions": 3, "files_linked": 2, "skipped": 1}


def test_reactions_are_separate_records(export_zip: Path) -> None:
    records, _, _ = read(export_zip)
    reactions = [
        r for r in records if isinstance(r, NetworkMessage) and r.content.kind == "reaction"
    ]
    assert [(r.id, r.sender.id, r.content.key, r.content.target) for r in reactions] == [
        ("1700000000.123456:react:thumbsup:U02BOB", "U02BOB", "👍", "1700000000.123456"),
        ("1700000000.123456:react:thumbsup:U01ALICE", "U01ALICE", "👍", "1700000000.123456"),
        (
            "1700000000.123456:react:custom_party:U02BOB",
            "U02BOB",
            ":custom_party:",
            "1700000000.123456",
        ),
    ]
    assert all(r.ts == 1_700_000_000_123 for r in reactions)


def test_folder_and_zip_give_the_same_records(export_zip: Path, tmp_path: Path) -> None:
    wrapped = zip_tree(SAMPLES, tmp_path / "wrapped.zip", prefix="Acme export/")
    assert read(SAMPLES)[0] == read(export_zip)[0] == read(wrapped)[0]


def test_options(export_zip: Path) -> None:
    records, _, _ = read(export_zip, channels="#general")
    assert {r.portal for r in records} == {"C01GENERAL"}
    records, _, _ = read(export_zip, names="real")
    assert records[0].members[0] == Member("U01ALICE", "Alice Liddell")
    with pytest.raises(SourceError, match="names"):
        read(export_zip, names="nick")


def test_ts_and_emoji_helpers() -> None:
    assert ts_ms("1700000000.123456") == 1_700_000_000_123
    assert ts_ms("1700000000") == 1_700_000_000_000
    assert ts_ms("1700000000.1") == 1_700_000_000_100
    assert emoji("thumbsup::skin-tone-3") == "👍\U0001f3fc"
    assert emoji("+1") == "👍"
    assert emoji("parrot") == ":parrot:"


@pytest.mark.parametrize(
    ("text", "body", "html"),
    [
        ("plain text", "plain text", None),
        ("a &lt;b&gt; &amp; c", "a <b> & c", None),
        ("*bold* and _it_", "bold and it", "<strong>bold</strong> and <em>it</em>"),
        ("snake_case_name stays", "snake_case_name stays", None),
        ("2*3*4 = 24", "2*3*4 = 24", None),
        ("<http://x.org>", "http://x.org", '<a href="http://x.org">http://x.org</a>'),
        ("<mailto:a@b.c|a@b.c>", "a@b.c", '<a href="mailto:a@b.c">a@b.c</a>'),
        ("<!here> look", "@here look", None),
        ("<!subteam^S1|@ops> hi", "@ops hi", None),
        ("<@U999|old> hi", "@old hi", None),
        ("<#C01GENERAL>", "#general", None),
        ("&gt; quoted\nreply", "> quoted\nreply", "<blockquote>quoted</blockquote>reply"),
        ("line1\n*line2*", "line1\nline2", "line1<br><strong>line2</strong>"),
        ("`<@U02BOB>`", "@Bob Builder", "<code>@Bob Builder</code>"),
        ("*<http://x|x>*", "x (http://x)", '<strong><a href="http://x">x</a></strong>'),
    ],
)
def test_mrkdwn(text: str, body: str, html: str | None) -> None:
    md = Mrkdwn({"U02BOB": "Bob Builder"}, {"C01GENERAL": "general"})
    assert md.render(text) == (body, html)


def test_bad_day_file_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("users.json", "[]")
        zf.writestr("channels.json", '[{"id": "C1", "name": "c"}]')
        zf.writestr("c/2024-01-01.json", "[{not json")
        zf.writestr("c/2024-01-02.json", '{"not": "a list"}')
        zf.writestr("c/2024-01-03.json", '[{"user": "U1", "text": "ok", "ts": "1704240000.0"}]')
        zf.writestr("../2024-01-04.json", "[]")
    records, rejected, _ = read(archive)
    assert [r.where for r in rejected] == ["c/2024-01-01.json", "c/2024-01-02.json"]
    assert "invalid JSON" in rejected[0].reason
    assert rejected[1].reason == "day file not a JSON array"
    assert [r.content.body for r in records if isinstance(r, NetworkMessage)] == ["ok"]


def _export_zip(path: Path, days: dict[str, bytes | str]) -> Path:
    """A one-channel export ("c", user U1 "ann") with these day files."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("users.json", '[{"id": "U1", "name": "ann"}]')
        zf.writestr("channels.json", '[{"id": "C1", "name": "c"}]')
        for day, data in days.items():
            zf.writestr(f"c/{day}.json", data)
    return path


def _bomb(path: Path, day_file: bytes) -> Path:
    """A damaged day file, then a good one that must still be read."""
    ok = '[{"user": "U1", "text": "ok", "ts": "1704240000.0"}]'
    return _export_zip(path, {"2024-01-02": day_file, "2024-01-03": ok})


def test_day_file_bomb_is_read_as_a_stream_up_to_its_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40 MB day file in a small zip: parsed entry by entry, cut at the cap, memory flat."""
    import connectors.sources.slack as slack

    message = b'{"user": "U1", "text": "' + b"x" * 1000 + b'", "ts": "1704153600.0"},'
    archive = _bomb(tmp_path / "bomb.zip", b"[" + message * 40_000 + b"{}]")
    assert archive.stat().st_size < 1_000_000
    monkeypatch.setattr(slack, "MAX_DAY_FILE_BYTES", 4 * 1024 * 1024)
    (records, rejected, _), peak = traced_peak(lambda: read(archive))
    cut = [r for r in rejected if r.where == "c/2024-01-02.json"]
    assert len(cut) == 1 and "larger than 4194304 bytes" in cut[0].reason
    bodies = [m.content.body for m in messages(records)]
    assert bodies[-1] == "ok"  # the next day file is still read
    # What was read before the cut is imported: about 4 MB of 1 KB messages.
    assert 3_000 < len(bodies) < 4_200
    assert peak < 64 * 1024 * 1024, peak  # records kept by the collector, not the file


def test_endless_string_in_a_day_file_is_cut_not_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import connectors.sources.slack as slack

    archive = _bomb(tmp_path / "bomb.zip", b'[{"text": "' + b"a" * 50_000_000)
    monkeypatch.setattr(slack, "MAX_DAY_FILE_BYTES", 1024 * 1024)
    (records, rejected, _), peak = traced_peak(lambda: read(archive))
    assert [r.where for r in rejected] == ["c/2024-01-02.json"]
    assert "larger than 1048576 bytes" in rejected[0].reason
    assert [m.content.body for m in messages(records)] == ["ok"]
    assert peak < 16 * 1024 * 1024, peak


@pytest.mark.parametrize(
    "offset, value, reason",
    [(8, 0x1, "encrypted zip entry"), (10, 9, "compression method 9")],  # 9: Deflate64
)
def test_unreadable_zip_entries_are_rejected_by_name(
    tmp_path: Path, offset: int, value: int, reason: str
) -> None:
    archive = _bomb(tmp_path / "x.zip", b"[]")
    data = bytearray(archive.read_bytes())
    # The central directory record of the day file: its name starts 46 bytes in.
    record = data.rindex(b"c/2024-01-02.json") - 46
    assert data[record : record + 4] == b"PK\x01\x02"
    data[record + offset] |= value
    archive.write_bytes(bytes(data))
    records, rejected, _ = read(archive)
    assert [r.where for r in rejected] == ["c/2024-01-02.json"]
    assert reason in rejected[0].reason
    assert [m.content.body for m in messages(records)] == ["ok"]


def test_damaged_or_foreign_input(export_zip: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.zip"
    broken.write_bytes(export_zip.read_bytes()[:300])
    with pytest.raises(SourceError, match=r"broken\.zip"):
        read(broken)
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(SourceError, match="not a Slack export"):
        read(foreign)
    with pytest.raises(SourceError, match="no such file"):
        read(tmp_path / "missing.zip")


def test_ids_stable(export_zip: Path) -> None:
    first = [(r.portal, r.id, r.part) for r in read(export_zip)[0] if hasattr(r, "id")]
    again = [(r.portal, r.id, r.part) for r in read(export_zip)[0] if hasattr(r, "id")]
    assert first == again
    assert len(set(first)) == len(first)


# Hostile shapes: each bad entry is one rejection naming the file, index and
# field; its neighbours still arrive.
_GOOD = {"user": "U1", "text": "good", "ts": "1704240000.0"}


def _deep(levels: int) -> object:
    """Lists ``levels`` deep (a day file of 200,000 levels is tested below)."""
    value: object = "x"
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"user": "U1", "text": 5, "ts": "1704240001.0"}, "'text'"),
        ({"user": ["U1"], "text": "x", "ts": "1704240001.0"}, "'user'"),
        ({"user": "U1", "text": "x", "ts": 1704240001}, "'ts'"),
        ({"user": "U1", "text": "a\u0000b", "ts": "1704240001.0"}, "NUL"),
        ({"user": "U1", "text": "x", "ts": "1704240001.0", "files": {"id": 1}}, "'files'"),
        (
            {"user": "U1", "text": "x", "ts": "1704240001.0", "reactions": [{"users": "U1"}]},
            "'reactions[0].users'",
        ),
        ({"user": "U1", "text": "x", "ts": "1704240001.0", "blocks": _deep(40)}, "deeper"),
        ("just a string", "expected an object"),
    ],
)
def test_message_of_the_wrong_shape_is_one_rejection(
    tmp_path: Path, bad: object, field: str
) -> None:
    import json

    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("users.json", '[{"id": "U1", "name": "ann"}]')
        zf.writestr("channels.json", '[{"id": "C1", "name": "c"}]')
        zf.writestr("c/2024-01-03.json", json.dumps([bad, _GOOD]))
    records, rejected, _ = read(archive)
    assert len(rejected) == 1, rejected
    assert rejected[0].where == "c/2024-01-03.json[0]"
    assert field in rejected[0].reason
    assert [m.content.body for m in messages(records)] == ["good"]


def test_day_file_nested_too_deep_is_rejected_not_a_crash(tmp_path: Path) -> None:
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("users.json", "[]")
        zf.writestr("channels.json", '[{"id": "C1", "name": "c"}]')
        zf.writestr("c/2024-01-02.json", "[" * 200_000 + "]" * 200_000)
        zf.writestr("c/2024-01-03.json", '[{"user": "U1", "text": "ok", "ts": "1704240000.0"}]')
    records, rejected, _ = read(archive)
    assert [r.where for r in rejected] == ["c/2024-01-02.json[0]"]
    assert "deeper than 32 levels" in rejected[0].reason
    assert [m.content.body for m in messages(records)] == ["ok"]


@pytest.mark.parametrize(
    "name, entry, field",
    [
        ("users.json", {"id": "U2", "profile": {"display_name": 7}}, "'profile.display_name'"),
        ("users.json", {"id": 2}, "'id'"),
        ("channels.json", {"id": "C2", "name": "d", "members": "U1"}, "'members'"),
        ("channels.json", {"id": "C2", "name": "d", "topic": {"value": []}}, "'topic.value'"),
    ],
)
def test_metadata_entry_of_the_wrong_shape_is_one_rejection(
    tmp_path: Path, name: str, entry: dict, field: str
) -> None:
    import json

    users = [{"id": "U1", "name": "ann"}]
    channels = [{"id": "C1", "name": "c"}]
    (users if name == "users.json" else channels).insert(0, entry)
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("users.json", json.dumps(users))
        zf.writestr("channels.json", json.dumps(channels))
        zf.writestr("c/2024-01-03.json", json.dumps([_GOOD]))
    records, rejected, _ = read(archive)
    assert [r.where for r in rejected] == [f"{name}[0]"]
    assert field in rejected[0].reason
    good = messages(records)
    assert [m.content.body for m in good] == ["good"]
    assert good[0].sender.name == "ann"


def _one_day(tmp_path: Path, entries: list[dict]) -> Path:
    import json

    return _export_zip(tmp_path / "x.zip", {"2015-01-02": json.dumps(entries)})


def test_old_file_comment_takes_its_author_from_the_comment(tmp_path: Path) -> None:
    entry = {
        "type": "message",
        "subtype": "file_comment",
        "ts": "1420200000.000100",
        "text": "",
        "comment": {"user": "U1", "comment": "nice picture"},
    }
    records, rejected, _ = read(_one_day(tmp_path, [entry]))
    assert rejected == []
    (m,) = messages(records)
    assert (m.sender, m.content.body) == (Sender("U1", "ann"), "nice picture")


def test_old_file_share_with_a_singular_file_is_counted(tmp_path: Path) -> None:
    entry = {
        "type": "message",
        "subtype": "file_share",
        "user": "U1",
        "ts": "1420200000.000200",
        "text": "",
        "file": {"id": "F1", "name": "plan.pdf", "url_private": "https://files.slack.com/p.pdf"},
    }
    records, rejected, source = read(_one_day(tmp_path, [entry]))
    assert rejected == []
    (m,) = messages(records)
    assert "plan.pdf" in m.content.body
    assert source.stats["files_linked"] == 1


def test_integration_bot_without_username_gets_a_name(tmp_path: Path) -> None:
    entry = {
        "type": "message",
        "subtype": "bot_message",
        "bot_id": "B9",
        "ts": "1420200000.0003",
        "text": "build passed",
    }
    records, _, _ = read(_one_day(tmp_path, [entry]))
    (m,) = messages(records)
    assert m.sender == Sender("B9", "bot B9")
