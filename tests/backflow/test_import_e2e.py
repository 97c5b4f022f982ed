"""Each importer end to end: export file -> `backflow import` -> pipeline -> sink -> Synapse.

One worker and one sink serve the whole module (a faust worker joining a group
waits a session timeout on the mock broker); each test imports one format and
reads its rooms back from Synapse: the right messages, in timestamp order,
from the right ghosts, with origin_server_ts equal to the source timestamps.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from connectors.matrix.ghosts import ghost_user_id
from connectors.source import available
from tests.conftest import make_settings
from tests.helpers import SAMPLES, backflow_cli, portal_timeline, start_stages, stop_stages
from topics.records import NetworkMessage

SHOWN_KINDS = ("text", "notice", "emote", "media", "location")


@pytest.fixture(scope="module")
async def running(kafka, pg_admin, synapse, appservices, tmp_path_factory):
    """Settings plus a pipeline worker and a sink running against them."""
    from backflow.stack.postgres import drop_database

    tmp = tmp_path_factory.mktemp("e2e")
    settings, db = await make_settings(kafka, pg_admin, synapse, appservices["free"], tmp)
    children = start_stages(settings, logs=tmp)
    yield settings, children
    stop_stages(children)
    await drop_database(pg_admin, db)


def expected_rooms(fmt: str, path: Path) -> dict[str, list[NetworkMessage]]:
    """What the importer yields, per portal, in the order the room must show it."""
    source = available()[fmt](path)
    per_portal: dict[str, list[tuple[int, int, NetworkMessage]]] = defaultdict(list)
    for n, record in enumerate(source.read()):
        if isinstance(record, NetworkMessage) and record.content.kind in SHOWN_KINDS:
            per_portal[record.portal].append((record.ts, n, record))
    return {p: [m for _, _, m in sorted(items)] for p, items in per_portal.items()}


async def import_and_check(settings, children, fmt: str, path: Path) -> None:
    result = backflow_cli(settings, "import", fmt, str(path))
    assert result.returncode == 0, result.stderr
    expected = expected_rooms(fmt, path)
    assert expected, f"{fmt}: the sample yields no messages"
    registration = yaml.safe_load(open(settings.appservice.registration))
    user_prefix = registration["namespaces"]["users"][0]["regex"].lstrip("@").split(".*")[0]
    server = settings.homeserver.server_name
    network = next(iter(expected.values()))[0].network

    got: dict[str, list[dict]] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for portal in expected:
            got[portal] = await portal_timeline(settings, network, portal) or []
        if all(len(got[p]) >= len(ms) for p, ms in expected.items()):
            break
        assert all(c.poll() is None for c in children), "worker or sink exited"
        await asyncio.sleep(1)
    for portal, messages in expected.items():
        events = got[portal]
        assert [e["origin_server_ts"] for e in events] == [m.ts for m in messages], portal
        assert [e["sender"] for e in events] == [
            ghost_user_id(user_prefix, network, m.sender.id, server) for m in messages
        ], portal
        for event, message in zip(events, messages, strict=True):
            source = event["content"].get("fi.backflow.source", {})
            assert source.get("id") == message.id, (portal, event)
            if message.content.kind in ("text", "notice", "emote"):
                assert event["content"]["body"] == message.content.body
                msgtype = "m." + message.content.kind
                assert event["content"]["msgtype"] == msgtype


async def test_whatsapp_export_lands_in_order(running):
    settings, children = running
    await import_and_check(
        settings, children, "whatsapp", SAMPLES / "whatsapp" / "WhatsApp Chat with Family.txt"
    )


async def test_slack_export_lands_in_order(running):
    settings, children = running
    await import_and_check(settings, children, "slack", SAMPLES / "slack")


async def test_telegram_export_lands_in_order(running):
    settings, children = running
    await import_and_check(
        settings, children, "telegram", SAMPLES / "telegram" / "single" / "result.json"
    )


async def test_whatsapp_hard_cases_land_right_in_their_rooms(running, tmp_path):
    """Issue cases read back from Synapse: July stays July, _chat.txt files stay apart,
    and a refused header's lines never join the message before it."""
    from datetime import UTC, datetime

    from connectors.sources.whatsapp import portal_id

    settings, children = running
    july = tmp_path / "WhatsApp Chat with July.txt"
    july.write_text("".join(f"7/{d}/17, 2:11 PM - Ann: day {d}\n" for d in range(1, 12)))
    await import_and_check(settings, children, "whatsapp", july)
    events = await portal_timeline(settings, "whatsapp", portal_id("July"))
    months = {datetime.fromtimestamp(e["origin_server_ts"] / 1000, UTC).month for e in events}
    assert months == {7} and len(events) == 11

    chats = []
    for name in ("Alice", "Bob"):
        chat = tmp_path / f"WhatsApp Chat - {name}" / "_chat.txt"
        chat.parent.mkdir()
        chat.write_text(f"[1/3/20, 10:00:00] {name}: only {name}\n")
        await import_and_check(settings, children, "whatsapp", chat)
        chats.append(await portal_timeline(settings, "whatsapp", portal_id(name)))
    assert [[e["content"]["body"] for e in room] for room in chats] == [
        ["only Alice"], ["only Bob"]
    ]

    refused = tmp_path / "WhatsApp Chat with Refused.txt"
    refused.write_text(
        "01/02/2024, 10:00 - Ann: mine\n"
        "01/02/2024, 25:61 - Bo: his\n"
        "and his second line\n"
        "01/02/2024, 10:02 - Ann: mine again\n"
    )
    await import_and_check(settings, children, "whatsapp", refused)
    room = await portal_timeline(settings, "whatsapp", portal_id("Refused"))
    assert [e["content"]["body"] for e in room] == ["mine", "mine again"]


async def signal_rooms_read_back(
    settings, children, fmt: str, path: Path, options: dict[str, str], env: dict | None = None
) -> dict[tuple[str, int], dict]:
    """Import a Signal input through the CLI and read every portal back from Synapse.

    Checks what every Signal format must show: messages in order from the right
    ghosts, the reply pointing at its target's event, the reaction on its
    message, the edit replacing the original, the image uploaded.
    """
    args = [a for k, v in options.items() for a in ("-o", f"{k}={v}")]
    result = backflow_cli(settings, "import", fmt, str(path), *args, env=env)
    assert result.returncode == 0, result.stderr
    source = available()[fmt](path, options)  # the passphrase, if any, from os.environ
    records = [r for r in source.read() if isinstance(r, NetworkMessage)]
    portals = {r.portal for r in records}
    registration = yaml.safe_load(open(settings.appservice.registration))
    user_prefix = registration["namespaces"]["users"][0]["regex"].lstrip("@").split(".*")[0]
    server = settings.homeserver.server_name
    types = ("m.room.message", "m.reaction")
    got: dict[str, list[dict]] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for portal in portals:
            got[portal] = await portal_timeline(settings, "signal", portal, types) or []
        if all(len(got[p]) >= sum(r.portal == p for r in records) for p in portals):
            break
        assert all(c.poll() is None for c in children), "worker or sink exited"
        await asyncio.sleep(1)
    by_source = {}
    for portal in portals:
        shown = [m for m in records if m.portal == portal]
        events = got[portal]
        assert len(events) == len(shown), (portal, events)
        plain = [e for e in events if e["type"] == "m.room.message"]
        plain = [e for e in plain if "m.new_content" not in e["content"]]
        visible = sorted((m for m in shown if m.content.kind in SHOWN_KINDS), key=lambda m: m.ts)
        assert [e["origin_server_ts"] for e in plain] == [m.ts for m in visible], portal
        assert [e["sender"] for e in plain] == [
            ghost_user_id(user_prefix, "signal", m.sender.id, server) for m in visible
        ], portal
        for event in events:
            marker = event["content"]["fi.backflow.source"]
            by_source[(marker["id"], marker.get("part", 0))] = event
    return by_source


async def test_signal_export_lands_with_replies_reactions_edits_and_an_image(running, tmp_path):
    from tests.signal_helpers import ALICE_ACI, SELF_ACI, T0, write_export

    settings, children = running
    root = write_export(tmp_path)
    events = await signal_rooms_read_back(
        settings, children, "signal-export", root, {"self_aci": SELF_ACI}
    )
    own = events[(f"{SELF_ACI}|{T0 + 2_000}", 0)]
    reply = events[(f"{ALICE_ACI}|{T0 + 3_000}", 0)]
    assert reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == own["event_id"]
    reaction = events[(f"{ALICE_ACI}|{T0 + 3_000}|reaction|{SELF_ACI}", 0)]
    assert reaction["content"]["m.relates_to"] == {
        "rel_type": "m.annotation",
        "event_id": reply["event_id"],
        "key": "👍",
    }
    image = events[(f"{ALICE_ACI}|{T0 + 4_000}", 0)]["content"]
    assert image["msgtype"] == "m.image" and image["url"].startswith("mxc://")
    original = events[(f"{ALICE_ACI}|{T0 + 5_000}", 0)]
    edit = events[(f"{ALICE_ACI}|{T0 + 6_000}", 0)]["content"]
    assert edit["m.relates_to"] == {"rel_type": "m.replace", "event_id": original["event_id"]}
    assert edit["m.new_content"]["body"] == "first (fixed)"


async def test_signal_backup_lands_and_a_second_import_duplicates_nothing(
    running, tmp_path, monkeypatch
):
    from tests.signal_backup_writer import SHOWN_PASSPHRASE, write_backup
    from tests.signal_helpers import SELF_ACI, T0

    settings, children = running
    # Other contacts and group than the export's test: rooms of their own.
    alice, bob = "a11ce000-0000-4000-8000-0000000000b2", "b0b00000-0000-4000-8000-0000000000b2"
    path = write_backup(tmp_path / "signal.backup", alice=alice, bob=bob, master_key=b"m" * 32)
    env = {"SIGNAL_BACKUP_PASSPHRASE": SHOWN_PASSPHRASE}
    monkeypatch.setenv("SIGNAL_BACKUP_PASSPHRASE", SHOWN_PASSPHRASE)
    events = await signal_rooms_read_back(settings, children, "signal-backup", path, {}, env)
    own = events[(f"{SELF_ACI}|{T0 + 2_000}", 0)]
    reply = events[(f"{alice}|{T0 + 3_000}", 0)]
    assert reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == own["event_id"]
    reaction = events[(f"{alice}|{T0 + 3_000}|reaction|{SELF_ACI}", 0)]
    assert reaction["content"]["m.relates_to"]["event_id"] == reply["event_id"]
    image = events[(f"{alice}|{T0 + 4_000}", 0)]["content"]
    assert image["msgtype"] == "m.image" and image["url"].startswith("mxc://")
    edit = events[(f"{alice}|{T0 + 6_000}", 0)]["content"]
    assert edit["m.relates_to"]["event_id"] == events[(f"{alice}|{T0 + 5_000}", 0)]["event_id"]
    styled = events[(f"{bob}|{T0 + 7_000}", 0)]["content"]
    spoiler = '<span data-mx-spoiler="">you</span>'  # as the sanitizer writes the attribute
    assert styled["formatted_body"] == f"<strong>Hello</strong> {spoiler} sss"

    again = backflow_cli(settings, "import", "signal-backup", str(path), env=env)
    assert again.returncode == 0, again.stderr
    await asyncio.sleep(5)
    types = ("m.room.message", "m.reaction")
    rooms = {e["content"]["fi.backflow.source"]["portal"] for e in events.values()}
    after = [e for p in rooms for e in await portal_timeline(settings, "signal", p, types) or []]
    assert sorted(e["event_id"] for e in after) == sorted(e["event_id"] for e in events.values())


async def test_signal_backup_v2_lands_with_its_image(running, tmp_path, monkeypatch):
    from tests.signal_helpers import SELF_ACI, T0, aci_b64, b64
    from tests.signal_v2_writer import SHOWN_RECOVERY_KEY, v2_frames, write_v2

    settings, children = running
    alice = "a11ce000-0000-4000-8000-0000000000c3"  # rooms apart from the other Signal tests
    frames = v2_frames()
    for frame in frames:
        recipient = frame.get("recipient", {})
        if recipient.get("id") == "2":
            recipient["contact"]["aci"] = aci_b64(alice)
        if recipient.get("id") == "4":
            recipient["group"]["masterKey"] = b64(b"v" * 32)
    root = write_v2(tmp_path, frames)
    env = {"SIGNAL_RECOVERY_KEY": SHOWN_RECOVERY_KEY}
    monkeypatch.setenv("SIGNAL_RECOVERY_KEY", SHOWN_RECOVERY_KEY)
    options = {"self_aci": SELF_ACI}
    events = await signal_rooms_read_back(
        settings, children, "signal-backup-v2", root, options, env
    )
    own = events[(f"{SELF_ACI}|{T0 + 2_000}", 0)]
    reply = events[(f"{alice}|{T0 + 3_000}", 0)]
    assert reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == own["event_id"]
    reaction = events[(f"{alice}|{T0 + 3_000}|reaction|{SELF_ACI}", 0)]
    assert reaction["content"]["m.relates_to"]["event_id"] == reply["event_id"]
    image = events[(f"{alice}|{T0 + 4_000}", 0)]["content"]
    assert image["msgtype"] == "m.image" and image["url"].startswith("mxc://")
