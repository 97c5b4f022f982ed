"""The Signal plaintext export importer (`signal-export`), on exports written by the tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from connectors.conformance import by_id, check_source, messages, run
from connectors.source import SourceError
from connectors.sources.signal_export import SignalExportSource
from connectors.sources.signal_ids import Sho, group_identifier, group_portal, legacy_group_portal
from tests.signal_helpers import (
    ALICE_ACI,
    BOB_ACI,
    GROUP_PORTAL,
    MASTER_KEY,
    SELF_ACI,
    T0,
    recipients_and_chats,
    write_export,
)
from topics.records import PortalInfo


def test_sho_matches_libsignals_vector() -> None:
    sho = Sho(b"asd")
    sho.absorb_and_ratchet(b"asdasd")
    assert sho.squeeze_and_ratchet(64).hex() == (
        "392cb9449373037fa0c11aebed69cca3b7d3bc9790878f341729c65d5506442f"
        "04986cb5c9098f277c3ea640a4dc6e90372b433a90af9aea7072eaba3398c4fe"
    )


def test_group_portal_is_base64_of_the_identifier_and_legacy_agrees() -> None:
    identifier = group_identifier(MASTER_KEY)
    assert len(identifier) == 32 and len(group_portal(identifier)) == 44
    legacy = "__signal_group__v2__!" + identifier.hex()
    assert legacy_group_portal(legacy) == group_portal(identifier) == GROUP_PORTAL
    assert legacy_group_portal("__signal_group__v2__!zz") is None


def test_export_conforms_and_maps_every_case(tmp_path: Path) -> None:
    root = write_export(tmp_path)
    report = check_source(
        lambda: SignalExportSource(root, {"self_aci": SELF_ACI}),
        {"text", "media", "notice", "reaction", "edit"},
    )
    records = by_id(report.records)
    dm, own = f"{ALICE_ACI}|{T0 + 1_000}", f"{SELF_ACI}|{T0 + 2_000}"
    assert records[(dm, 0)].content.body == "hello there"
    assert records[(own, 0)].sender.id == SELF_ACI
    reply = records[(f"{ALICE_ACI}|{T0 + 3_000}", 0)]
    assert reply.reply_to == own
    reaction = records[(f"{ALICE_ACI}|{T0 + 3_000}|reaction|{SELF_ACI}", 0)]
    assert (reaction.content.key, reaction.content.target) == ("👍", reply.id)
    image = records[(f"{ALICE_ACI}|{T0 + 4_000}", 0)].content
    assert (image.kind, image.media_type, image.mimetype) == ("media", "image", "image/png")
    missing = records[(f"{ALICE_ACI}|{T0 + 4_000}", 1)].content
    assert missing.kind == "notice" and "clip.mp4" in missing.body
    # An edited item keeps its oldest revision's id; the current text is an edit.
    original = records[(f"{ALICE_ACI}|{T0 + 5_000}", 0)]
    edit = records[(f"{ALICE_ACI}|{T0 + 6_000}", 0)]
    assert original.content.body == "frist"
    assert (edit.content.kind, edit.content.target, edit.content.body) == (
        "edit",
        original.id,
        "first (fixed)",
    )
    styled = records[(f"{BOB_ACI}|{T0 + 7_000}", 0)]
    assert styled.portal == GROUP_PORTAL
    assert styled.content.body == "Hello @Bob B and sss"
    assert styled.content.html == (
        "<strong>Hello</strong> @Bob B <span data-mx-spoiler>and</span> sss"
    )
    assert records[(f"{ALICE_ACI}|{T0 + 8_000}", 0)].content.body == "Sticker 🐱"
    assert records[(f"{BOB_ACI}|{T0 + 9_000}", 0)].content.kind == "notice"
    # Skipped on purpose: remote delete, disappearing, release notes; refused: time 0.
    assert f"{BOB_ACI}|{T0 + 9_500}" not in {m.id for m in messages(report.records)}
    assert [r.reason for r in report.rejected] == [
        "field 'chatItem.dateSent': timestamp 0: not imported"
    ]
    assert report.rejected[0].where == "main.jsonl:21"
    stats = report.stats
    assert stats["deleted_skipped"] == stats["disappearing_skipped"] == 1
    assert stats["unknown_frames"] == 1 and stats["chats_skipped"] == 1
    portals = {r.portal: r for r in report.records if isinstance(r, PortalInfo)}
    assert portals[GROUP_PORTAL].name == "Hikers"
    assert {m.id for m in portals[GROUP_PORTAL].members} == {ALICE_ACI, BOB_ACI}
    assert portals[ALICE_ACI].name == "Alice"


def test_own_messages_without_self_aci_are_refused_with_the_option_named(tmp_path: Path) -> None:
    records, rejected, source = run(SignalExportSource, write_export(tmp_path))
    own = [r for r in rejected if "self_aci" in r.reason]
    assert len(own) == 1 and own[0].where == "main.jsonl:12"
    assert source.warnings == ["own messages were not imported: pass -o self_aci=UUID (your ACI)"]
    assert all(m.sender.id != SELF_ACI for m in messages(records))
    # The reaction by the own account goes too; the message it sat on stays.
    assert source.stats["reactions_skipped"] == 1


def test_bad_options_and_inputs_are_one_clear_error(tmp_path: Path) -> None:
    root = write_export(tmp_path)
    with pytest.raises(SourceError, match="option self_aci: 'me' is not a UUID"):
        run(SignalExportSource, root, self_aci="me")
    with pytest.raises(SourceError, match="main.jsonl: no such file"):
        run(SignalExportSource, tmp_path / "nothing-here")
    (root / "main.jsonl").write_text('{"chatItem": {}}\n')
    with pytest.raises(SourceError, match="main.jsonl:1: the first line is not a BackupInfo"):
        run(SignalExportSource, root)
    (root / "main.jsonl").write_text("PK\x03\x04 binary\n")
    with pytest.raises(SourceError, match="main.jsonl:1: not JSON"):
        run(SignalExportSource, root)


def test_damaged_lines_are_rejected_by_line_and_the_rest_flows(tmp_path: Path) -> None:
    frames = recipients_and_chats()
    late = {
        "chatItem": {
            "chatId": "10",
            "authorId": "2",
            "dateSent": str(T0 + 50),
            "standardMessage": {"text": {"body": "after the damage"}},
        }
    }
    lines = (
        "{not json",
        json.dumps({"chatItem": {"chatId": "10", "authorId": "2", "dateSent": {"x": 1}}}),
        json.dumps({"chatItem": {"chatId": "99", "authorId": "2", "dateSent": "1"}}),
        "[" * 100 + "]" * 100,
        json.dumps(late),
    )
    root = write_export(tmp_path, frames, lines)
    records, rejected, _ = run(SignalExportSource, root)
    first = len(frames) + 2
    assert [(r.where, r.reason.split(":")[0]) for r in rejected] == [
        (f"main.jsonl:{first}", "invalid JSON"),
        (f"main.jsonl:{first + 1}", "field 'chatItem.dateSent'"),
        (f"main.jsonl:{first + 2}", "field 'chatItem.chatId'"),
        (f"main.jsonl:{first + 3}", "frame is not an object of at most 32 levels"),
    ]
    assert [m.content.body for m in messages(records)] == ["after the damage"]


def test_attachments_outside_the_export_are_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    frames = [
        *recipients_and_chats(),
        {
            "chatItem": {
                "chatId": "10",
                "authorId": "2",
                "dateSent": str(T0),
                "standardMessage": {
                    "attachments": [
                        {"pointer": {"fileName": "../../secret.txt"}},
                        {"pointer": {"fileName": "linked.txt"}},
                        {"pointer": {"fileName": "/etc/passwd"}},
                    ]
                },
            }
        },
    ]
    root = write_export(tmp_path / "x", frames)
    (root / "files" / "li").mkdir()
    os.symlink(secret, root / "files" / "li" / "linked.txt")
    os.symlink(secret, root / "files" / "linked.txt.txt")
    records, rejected, source = run(SignalExportSource, root)
    contents = [m.content for m in messages(records)]
    assert [c.kind for c in contents] == ["notice"] * 3
    assert all("top secret" not in (c.body or "") and c.data is None for c in contents)
    assert source.stats["media_missing"] == 3 and rejected == []


def test_an_over_long_line_is_rejected_unread(tmp_path: Path) -> None:
    from connectors.sources import signal_export

    root = write_export(tmp_path, recipients_and_chats(), ('{"chatItem": "' + "x" * 5000 + '"}',))
    limit = signal_export.MAX_LINE_BYTES
    signal_export.MAX_LINE_BYTES = 4096
    try:
        _, rejected, _ = run(SignalExportSource, root)
    finally:
        signal_export.MAX_LINE_BYTES = limit
    assert [r.reason for r in rejected] == ["line over 4096 bytes: not read"]


def test_the_signal_importers_are_registered() -> None:
    from connectors.source import available
    from connectors.sources.signal_backup import SignalBackupSource
    from connectors.sources.signal_backup_v2 import SignalBackupV2Source

    found = available()
    assert found["signal-export"] is SignalExportSource
    assert found["signal-backup"] is SignalBackupSource
    assert found["signal-backup-v2"] is SignalBackupV2Source
