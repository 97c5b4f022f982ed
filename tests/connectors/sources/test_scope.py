"""No importer reads a file outside its export, whatever links or names the export holds."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from connectors.conformance import messages, run
from connectors.sources.scope import ExportFolder, OutsideExport, read_bounded
from connectors.sources.slack import SlackSource
from connectors.sources.telegram import TelegramSource
from connectors.sources.whatsapp import WhatsAppSource
from tests.helpers import SAMPLES

SECRET = b"BACKFLOW_TEST_SECRET=do-not-import\n"


def leaks(records: list) -> bool:
    """Whether the secret reached any record, as text or as inline media bytes."""
    marks = (SECRET.decode().strip(), base64.b64encode(SECRET).decode())
    return any(mark in str(r) for r in records for mark in marks)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every export, that no import may read."""
    path = tmp_path / "outside" / "secret.jpg"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def test_locate_refuses_names_and_links_that_leave_the_folder(tmp_path: Path, secret: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    (root / "ok.txt").write_text("fine")
    (root / "link.jpg").symlink_to(secret)
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(tmp_path / "outside", target_is_directory=True)
    folder = ExportFolder(root)
    assert folder.locate("ok.txt") == (root / "ok.txt").resolve()
    assert folder.locate("missing.txt") is None
    for name in ("link.jpg", "sub/up/secret.jpg", "../outside/secret.jpg", str(secret), "a\0b"):
        with pytest.raises(OutsideExport):
            folder.locate(name)
    assert not folder.contains(root / "link.jpg")
    assert folder.contains(root / "ok.txt")


def test_reads_are_bounded_by_the_bytes_read_not_st_size(tmp_path: Path) -> None:
    status = Path("/proc/self/status")  # st_size 0, several hundred bytes of content
    assert status.stat().st_size == 0
    size, data = read_bounded(status, 10)
    assert data is None and size > 10
    small = tmp_path / "small"
    small.write_bytes(b"12345")
    assert read_bounded(small, 5) == (5, b"12345")
    assert read_bounded(small, 4) == (5, None)


def test_whatsapp_attachment_linked_outside_is_not_read(tmp_path: Path, secret: Path) -> None:
    chat = tmp_path / "chat" / "WhatsApp Chat with Eve.txt"
    chat.parent.mkdir()
    chat.write_text(
        "01/02/2024, 10:00 - Eve: IMG-1.jpg (file attached)\n"
        "01/02/2024, 10:01 - Eve: IMG-2.jpg (file attached)\n"
    )
    (chat.parent / "IMG-1.jpg").symlink_to(secret)
    (chat.parent / "IMG-2.jpg").write_bytes(b"a real photo")
    records, _, source = run(WhatsAppSource, chat)
    contents = [m.content for m in messages(records)]
    assert [c.kind for c in contents] == ["notice", "media"]
    assert "outside the export folder" in (contents[0].body or "")
    assert not leaks(records)
    assert source.stats["media_refused"] == 1


def test_slack_day_file_linked_outside_is_refused(tmp_path: Path) -> None:
    export = tmp_path / "slack"
    shutil.copytree(SAMPLES / "slack", export)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(
        json.dumps(
            [{"type": "message", "user": "U01ALICE", "ts": "1704067200.000100", "text": "STOLEN"}]
        )
    )
    (export / "general" / "2024-01-09.json").symlink_to(outside)
    records, rejected, _ = run(SlackSource, export)
    baseline, before, _ = run(SlackSource, SAMPLES / "slack")
    (refused,) = [r for r in rejected if r not in before]
    assert refused.where == "general/2024-01-09.json"
    assert "outside the export folder" in refused.reason
    assert all("STOLEN" not in (m.content.body or "") for m in messages(records))
    assert len(messages(records)) == len(messages(baseline))  # the rest still comes through


def test_telegram_media_linked_outside_is_rejected(tmp_path: Path, secret: Path) -> None:
    export = tmp_path / "tg"
    shutil.copytree(SAMPLES / "telegram" / "single", export)
    result = json.loads((export / "result.json").read_text())
    photo = next(m for m in result["messages"] if "photo" in m)
    os.remove(export / photo["photo"])
    (export / photo["photo"]).symlink_to(secret)
    records, rejected, _ = run(TelegramSource, export)
    _, before, _ = run(TelegramSource, SAMPLES / "telegram" / "single")
    (refused,) = [r for r in rejected if r not in before]
    assert "is a link to a file outside the export folder" in refused.reason
    assert refused.where.endswith(f"message {photo['id']}")
    assert not leaks(records)
