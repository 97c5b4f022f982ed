"""The Signal backup v2 importer (`signal-backup-v2`), on folders the tests' writer makes."""

from __future__ import annotations

import base64
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
from connectors.sources.signal_backup_v2 import SignalBackupV2Source
from connectors.sources.signal_export import SignalExportSource
from tests.signal_helpers import (
    ALICE_ACI,
    BOB_ACI,
    GROUP_PORTAL,
    PNG,
    SELF_ACI,
    T0,
    recipients_and_chats,
    write_export,
)
from tests.signal_v2_writer import RECOVERY_KEY, SHOWN_RECOVERY_KEY, write_v2


@pytest.fixture(autouse=True)
def recovery_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNAL_RECOVERY_KEY", SHOWN_RECOVERY_KEY)


def test_v2_conforms_and_maps_like_the_export(tmp_path: Path) -> None:
    root = write_v2(tmp_path)
    report = check_source(
        lambda: SignalBackupV2Source(root, {"self_aci": SELF_ACI}),
        {"text", "media", "notice", "reaction", "edit"},
    )
    records = by_id(report.records)
    image = records[(f"{ALICE_ACI}|{T0 + 4_000}", 0)].content
    assert image.kind == "media" and base64.b64decode(image.data) == PNG
    reply = records[(f"{ALICE_ACI}|{T0 + 3_000}", 0)]
    assert reply.reply_to == f"{SELF_ACI}|{T0 + 2_000}"
    edit = records[(f"{ALICE_ACI}|{T0 + 6_000}", 0)].content
    assert (edit.kind, edit.target) == ("edit", f"{ALICE_ACI}|{T0 + 5_000}")
    styled = records[(f"{BOB_ACI}|{T0 + 7_000}", 0)]
    assert styled.portal == GROUP_PORTAL
    assert styled.content.html == (
        "<strong>Hello</strong> @Bob B <span data-mx-spoiler>and</span> sss"
    )
    assert [r.where for r in report.rejected] == ["main frame 21"]  # dateSent 0
    assert report.stats["unknown_frames"] == 1

    snapshot = root / "signal-backup-2026-05-01-10-00-00"
    for path in (snapshot, snapshot / "main"):  # the snapshot or its main name it too
        again = by_id(run(SignalBackupV2Source, path, self_aci=SELF_ACI)[0])
        assert base64.b64decode(again[(f"{ALICE_ACI}|{T0 + 4_000}", 0)].content.data) == PNG

    export = write_export(tmp_path / "export")
    same = set(message_keys(run(SignalExportSource, export, self_aci=SELF_ACI)[0]))
    assert set(message_keys(report.records)) == same  # one chat history, one set of ids


def _refused(root: Path, **options: str) -> str:
    got = []
    with pytest.raises(SourceError) as caught:
        for item in SignalBackupV2Source(root, options).read():
            got.append(item)
    assert got == []
    message = str(caught.value)
    assert RECOVERY_KEY[:12] not in message.lower().replace(" ", "")
    return message


def test_wrong_key_or_changed_file_is_one_error_before_anything(tmp_path, monkeypatch) -> None:
    root = write_v2(tmp_path)
    monkeypatch.setenv("SIGNAL_RECOVERY_KEY", "a" * 64)
    assert "wrong recovery key, or the file was changed" in _refused(root)
    monkeypatch.setenv("SIGNAL_RECOVERY_KEY", RECOVERY_KEY)
    main = root / "signal-backup-2026-05-01-10-00-00" / "main"
    data = bytearray(main.read_bytes())
    data[len(data) // 2] ^= 1
    main.write_bytes(bytes(data))
    assert "its MAC does not match; nothing was imported" in _refused(root)
    main.write_bytes(bytes(data[:40]))
    assert "too short" in _refused(root)


def test_options_and_layout_errors(tmp_path: Path, monkeypatch) -> None:
    root = write_v2(tmp_path)
    with pytest.raises(SourceError, match="option recovery_key: refused"):
        run(SignalBackupV2Source, root, recovery_key=RECOVERY_KEY)
    assert "is not this backup's account" in _refused(root, self_aci=ALICE_ACI)
    monkeypatch.delenv("SIGNAL_RECOVERY_KEY")
    assert "no recovery key: set $SIGNAL_RECOVERY_KEY" in _refused(root)
    key_file = tmp_path / "key.txt"
    key_file.write_text(SHOWN_RECOVERY_KEY.replace("O", "#") + "\n")  # display form
    assert messages(run(SignalBackupV2Source, root, recovery_key_file=str(key_file))[0])
    key_file.write_text("short")
    assert "64 letters and digits; got 5" in _refused(root, recovery_key_file=str(key_file))
    monkeypatch.setenv("SIGNAL_RECOVERY_KEY", RECOVERY_KEY)
    assert "no signal-backup-*/main" in _refused(tmp_path)
    (root / "signal-backup-2026-05-01-10-00-00" / "metadata").write_bytes(b"\xff\xff")
    assert "not a backup v2 metadata file" in _refused(root)


def test_streaming_memory(tmp_path: Path) -> None:
    def make(n: int) -> SignalBackupV2Source:
        frames = recipients_and_chats()
        for i in range(n):
            item = {
                "chatId": "10",
                "authorId": "2",
                "dateSent": str(T0 + i),
                "standardMessage": {"text": {"body": f"message {i} " + "x" * (i % 40)}},
            }
            frames.append({"chatItem": item})
        return SignalBackupV2Source(write_v2(tmp_path / str(n), frames))

    assert_streaming_memory(make, 2_000, 20_000)
