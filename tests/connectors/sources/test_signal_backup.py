"""The Signal `.backup` importer (`signal-backup`), on backups the tests' encoder writes."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from connectors.conformance import (
    assert_streaming_memory,
    by_id,
    check_source,
    message_keys,
    messages,
    run,
)
from connectors.source import SourceError
from connectors.sources import signal_crypto
from connectors.sources.signal_backup import SignalBackupSource
from connectors.sources.signal_export import SignalExportSource
from tests.signal_backup_writer import (
    PASSPHRASE,
    SHOWN_PASSPHRASE,
    BackupWriter,
    write_backup,
    write_new_layout,
)
from tests.signal_helpers import ALICE_ACI, BOB_ACI, GROUP_PORTAL, SELF_ACI, T0, write_export
from topics.records import PortalInfo


@pytest.fixture(autouse=True)
def passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNAL_BACKUP_PASSPHRASE", SHOWN_PASSPHRASE)


def backup(path: Path, **options: str) -> SignalBackupSource:
    return SignalBackupSource(path, options)


# ---------------------------------------------------------------- key derivation


def test_legacy_key_derivation_follows_its_definition() -> None:
    """BRIEF 8: SHA-512(salt||p||p), 249,999 x SHA-512(h||p), HKDF-SHA256 'Backup Export'."""
    p, salt = PASSPHRASE.encode(), bytes(range(32))
    digest = hashlib.sha512(salt + p + p).digest()
    for _ in range(249_999):
        digest = hashlib.sha512(digest + p).digest()
    prk = hmac.new(bytes(32), digest[:32], "sha256").digest()
    t1 = hmac.new(prk, b"Backup Export\x01", "sha256").digest()
    t2 = hmac.new(prk, t1 + b"Backup Export\x02", "sha256").digest()
    assert signal_crypto.legacy_keys(p, salt) == (t1, t2)


def test_backup_v2_keys_match_the_published_vectors() -> None:
    aep = signal_crypto.normalize_recovery_key(
        "dtjs 858a sj6t v0jz sqrs mj0u bp33 5pis j98e 9ssn ss8m yoc0 8drh tckt yawv x45l".upper()
    )
    key = signal_crypto.backup_key(aep)
    assert key.hex() == "ea26a2ddb5dba5ef9e34e1b8dea1f5ae7f255306a6d2d883e542306eaa9fe985"
    backup_id = signal_crypto.backup_id(key, bytes.fromhex("659aa5f4a28dfcc11ea1b997537a3d95"))
    assert backup_id.hex() == "8a624fbc45379043f39f1391cddc5fe8"
    mac_key, aes_key = signal_crypto.message_backup_keys(key, backup_id)
    assert mac_key.hex() == "f425e22a607c529717e1e1b29f9fe139f9d1c7e7d01e371c7753c544a3026649"
    assert aes_key.hex() == "e143f4ad5668d8bfed2f88562f0693f53bda2c0e55c9d71730f30e24695fd6df"


# ---------------------------------------------------------------- mapping, both layouts


def test_new_layout_conforms_and_maps_every_case(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "signal-2026-05-01.backup")
    report = check_source(lambda: backup(path), {"text", "media", "notice", "reaction", "edit"})
    records = by_id(report.records)
    own = records[(f"{SELF_ACI}|{T0 + 2_000}", 0)]  # own ACI from the key-value frame
    reply = records[(f"{ALICE_ACI}|{T0 + 3_000}", 0)]
    assert reply.reply_to == own.id
    reaction = records[(f"{ALICE_ACI}|{T0 + 3_000}|reaction|{SELF_ACI}", 0)]
    assert (reaction.content.target, reaction.content.key, reaction.ts) == (
        reply.id,
        "👍",
        T0 + 3_500,
    )
    image = records[(f"{ALICE_ACI}|{T0 + 4_000}", 0)].content
    assert (image.kind, image.media_type, image.filename) == ("media", "image", "dot.png")
    assert "clip.mp4" in records[(f"{ALICE_ACI}|{T0 + 4_000}", 1)].content.body
    edit = records[(f"{ALICE_ACI}|{T0 + 6_000}", 0)].content
    assert (edit.kind, edit.target, edit.body) == (
        "edit",
        f"{ALICE_ACI}|{T0 + 5_000}",
        "first (fixed)",
    )
    styled = records[(f"{BOB_ACI}|{T0 + 7_000}", 0)]
    assert styled.portal == GROUP_PORTAL
    assert styled.content.html == "<strong>Hello</strong> <span data-mx-spoiler>you</span> sss"
    assert records[(f"{BOB_ACI}|{T0 + 8_000}", 0)].content.kind == "notice"
    ids = {m.id for m in messages(report.records)}
    assert f"{BOB_ACI}|{T0 + 9_000}" not in ids and f"{BOB_ACI}|{T0 + 9_500}" not in ids
    assert [(r.where, r.reason) for r in report.rejected] == [
        ("signal-2026-05-01.backup:thread 2 message 11", "date_sent is 0: not imported")
    ]
    portals = {r.portal: r for r in report.records if isinstance(r, PortalInfo)}
    assert portals[GROUP_PORTAL].name == "Hikers"
    assert {m.id for m in portals[GROUP_PORTAL].members} == {ALICE_ACI, BOB_ACI}
    assert report.stats["unknown_frames"] == 1 and report.stats["threads_without_aci"] == 1
    assert report.stats["deleted_skipped"] == report.stats["disappearing_skipped"] == 1


def test_old_layout_with_a_version_0_header(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "old.backup", layout="old", version=0)
    report = check_source(lambda: backup(path), {"text", "media", "reaction"})
    dm = [m for m in messages(report.records) if m.portal == ALICE_ACI]
    # sms and mms merged in sent order; the own ACI from the old shared preference.
    assert [(m.content.kind, m.content.body) for m in dm if m.content.kind != "reaction"] == [
        ("text", "hello"),
        ("text", "a picture"),
        ("media", "dot.png"),
        ("text", "mine"),
    ]
    assert dm[-1].sender.id == SELF_ACI
    picture = by_id(report.records)[(f"{ALICE_ACI}|{T0 + 2_000}", 0)]
    assert picture.reply_to == f"{ALICE_ACI}|{T0 + 1_000}"
    reactions = {m.content.target: m.content.key for m in dm if m.content.kind == "reaction"}
    assert reactions == {f"{ALICE_ACI}|{T0 + 1_000}": "😮", picture.id: "❤️"}
    assert report.rejected == []


def test_backup_and_export_of_one_chat_give_the_same_ids(tmp_path: Path) -> None:
    """Importing an overlapping export and backup duplicates nothing."""
    from_backup = set(message_keys(run(SignalBackupSource, write_backup(tmp_path / "b"))[0]))
    export = write_export(tmp_path)
    from_export = set(message_keys(run(SignalExportSource, export, self_aci=SELF_ACI)[0]))
    shared = from_backup & from_export
    own, styled = (
        (ALICE_ACI, f"{SELF_ACI}|{T0 + 2_000}", 0),
        (GROUP_PORTAL, f"{BOB_ACI}|{T0 + 7_000}", 0),
    )
    assert {own, styled} <= shared
    # Everything both samples hold (DM: 6 messages, 2 parts, a reaction; 2 in the group).
    assert len(shared) == 10, sorted(from_backup ^ from_export)


# ---------------------------------------------------------------- bad input


def _drain(source: SignalBackupSource) -> list:
    got: list = []
    with pytest.raises(SourceError) as caught:
        for item in source.read():
            got.append(item)
    assert got == [], "records were yielded before the error"
    message = str(caught.value)
    assert PASSPHRASE not in message.replace(" ", "") and "12345" not in message
    return [message]


def test_wrong_passphrase_is_one_error_at_the_first_frame(tmp_path: Path, monkeypatch) -> None:
    path = write_backup(tmp_path / "x.backup")
    monkeypatch.setenv("SIGNAL_BACKUP_PASSPHRASE", "5" * 30)
    [message] = _drain(backup(path))
    assert "wrong passphrase" in message and "first frame" in message
    old = write_backup(tmp_path / "old.backup", layout="old", version=0)
    assert "wrong passphrase" in _drain(backup(old))[0]


def test_a_tampered_frame_stops_the_import_before_anything_is_yielded(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "x.backup")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    [message] = _drain(backup(path))
    assert "fails its MAC" in message and "damaged or was changed" in message


def test_a_tampered_attachment_fails_its_mac(tmp_path: Path) -> None:
    path = tmp_path / "x.backup"
    with path.open("wb") as out:
        writer = BackupWriter(out)
        writer.corrupt_payloads = True
        write_new_layout(writer)
        writer.end()
    assert "the attachment after frame" in _drain(backup(path))[0]


def test_truncated_and_foreign_files_are_one_clear_error(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "x.backup")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 30])
    assert "truncated at byte" in _drain(backup(path))[0]
    path.write_bytes(whole[:600])
    assert "truncated at byte" in _drain(backup(path))[0]
    path.write_bytes(b"\x00\x00\x00\x05hello" + bytes(100))
    assert "not a Signal backup" in _drain(backup(path))[0]
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a Signal backup" in _drain(backup(path))[0]


def test_passphrase_never_from_argv_and_from_file_env_or_prompt(
    tmp_path: Path, monkeypatch
) -> None:
    path = write_backup(tmp_path / "x.backup")
    with pytest.raises(SourceError, match="option passphrase: refused"):
        run(SignalBackupSource, path, passphrase=PASSPHRASE)
    monkeypatch.delenv("SIGNAL_BACKUP_PASSPHRASE")
    source = backup(path)
    assert source.needs_secret()
    with pytest.raises(SourceError, match=r"no passphrase: set \$SIGNAL_BACKUP_PASSPHRASE"):
        list(source.read())
    secret = tmp_path / "passphrase.txt"
    secret.write_text(SHOWN_PASSPHRASE + "\n")
    assert messages(run(SignalBackupSource, path, passphrase_file=str(secret))[0])
    monkeypatch.setenv("MY_PASS", PASSPHRASE)
    assert messages(run(SignalBackupSource, path, passphrase_env="MY_PASS")[0])
    prompted = backup(path)
    prompted.secret = SHOWN_PASSPHRASE  # what `backflow import` sets from its prompt
    assert messages(list(prompted.read()))
    secret.write_text("1234")
    with pytest.raises(SourceError, match="30 digits .* got 4 characters") as caught:
        run(SignalBackupSource, path, passphrase_file=str(secret))
    assert "1234" not in str(caught.value)


def test_hostile_statements_never_leave_the_temporary_database(tmp_path: Path) -> None:
    outside = tmp_path / "planted.db"
    path = tmp_path / "x.backup"
    with path.open("wb") as out:
        writer = BackupWriter(out)
        write_new_layout(writer)
        writer.statement(f"ATTACH DATABASE '{outside}' AS planted")
        writer.statement("INSERT INTO message (_id) VALUES (900); ATTACH DATABASE 'x' AS y")
        writer.statement(
            "INSERT INTO message (_id) WITH RECURSIVE c(x) AS (SELECT 1000 UNION ALL "
            "SELECT x + 1 FROM c) SELECT x FROM c"
        )
        writer.statement("INSERT INTO reaction (emoji) SELECT emoji FROM reaction")  # doubling
        writer.statement("CREATE TRIGGER t AFTER INSERT ON message BEGIN DELETE FROM message; END")
        writer.statement("PRAGMA writable_schema = ON")
        writer.statement("INSERT INTO sqlite_sequence VALUES ('message', 5)")
        writer.end()
    records, rejected, source = run(SignalBackupSource, path)
    assert not outside.exists()
    reasons = [r.reason for r in rejected if "SQL statement refused" in r.reason]
    assert len(reasons) == 3, reasons  # two statements in one, recursion, copying a table
    assert any("access to reaction.emoji is prohibited" in r for r in reasons), reasons
    assert any("WITH RECURSIVE" in r and "not authorized" in r for r in reasons), reasons
    assert source.stats["statements_skipped"] == 4  # attach, trigger, pragma, sqlite_*
    assert len(messages(records)) > 5


def test_streaming_memory(tmp_path: Path) -> None:
    def make(n: int) -> SignalBackupSource:
        path = tmp_path / f"{n}.backup"
        with path.open("wb") as out:
            writer = BackupWriter(out)
            write_new_layout(writer, extra=n)
            writer.key_value("account.aci", SELF_ACI)
            writer.end()
        return backup(path)

    assert_streaming_memory(make, 1_000, 10_000)
