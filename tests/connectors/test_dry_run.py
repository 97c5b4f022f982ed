"""`backflow import --dry-run`: validated per-portal preview, nothing published."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from backflow.cli.main import cli
from connectors.dry_run import preview
from connectors.publish import describe_kinds
from connectors.sources.whatsapp import WhatsAppSource, portal_id
from tests.helpers import SAMPLES


def test_preview_counts_per_portal_and_names_rejections(tmp_path: Path) -> None:
    chat = tmp_path / "WhatsApp Chat with Ann.txt"
    chat.write_text(
        "01/02/2024, 10:00 - Ann: hi\n"
        "01/02/2024, 25:00 - Bo: bad time\n"
        "03/02/2024, 11:00 - Bo: IMG-9.jpg (file attached)\n"
        "05/02/2024, 12:00 - Bo: bye\n"
    )
    result = preview(WhatsAppSource(chat))
    (key,) = result.portals
    assert key == f"whatsapp:{portal_id('Ann')}"
    portal = result.portals[key]
    assert portal.name == "Ann"
    assert portal.kinds == Counter(text=2, notice=1)  # the missing file is a notice
    assert len(portal.senders) == 2
    assert result.rejected == [
        ("WhatsApp Chat with Ann.txt:2", "invalid date or time: no such time 25:00")
    ]
    lines = result.lines({"media_missing": 1}, [])
    assert "2024-02-01 .. 2024-02-05" in lines[1] and "3 messages from 2 senders" in lines[1]


def test_cli_dry_run_publishes_nothing(monkeypatch) -> None:
    # No broker listens here: a dry run that tried to publish would fail.
    monkeypatch.setenv("BACKFLOW_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    sample = SAMPLES / "whatsapp" / "WhatsApp Chat with Alice.txt"
    out = CliRunner().invoke(cli, ["import", "whatsapp", str(sample), "--dry-run"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("dry run: nothing published; 1 portals")
    assert f"whatsapp:{portal_id('Alice')} Alice:" in out.output
    assert "0 rejected" in out.output


def test_summary_counts_reactions_edits_and_media_apart() -> None:
    kinds = Counter(text=1376, notice=4, reaction=199, edit=3, media=12)
    assert describe_kinds(kinds) == "1380 messages, 199 reactions, 3 edits, 12 media"


def test_a_record_the_codec_refuses_is_named_by_file_and_line(tmp_path: Path) -> None:
    from topics.schema import MAX_TEXT_LEN

    chat = tmp_path / "chat.txt"
    chat.write_text(
        "01/02/2024, 10:00 - Ann: hi\n"
        f"01/02/2024, 10:01 - Bo: {'y' * (MAX_TEXT_LEN + 1)}\n"
        "01/02/2024, 10:02 - Ann: bye\n"
    )
    result = preview(WhatsAppSource(chat))
    assert [where for where, _ in result.rejected] == ["chat.txt:2"]
    assert sum(p.kinds["text"] for p in result.portals.values()) == 2
