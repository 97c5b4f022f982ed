"""The conformance kit, run against every built-in source and the example CSV source."""

from __future__ import annotations

import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.conformance import (
    assert_content_kinds,
    assert_ids_stable,
    assert_portal_metadata,
    assert_streaming_memory,
    assert_timestamps_sane,
    assert_valid_records,
    check_source,
    collect,
)
from connectors.source import Source, SourceItem, available
from connectors.sources.example_csv import CsvSource
from connectors.sources.jsonl import JsonlSource
from connectors.sources.slack import SlackSource
from connectors.sources.telegram import TelegramSource
from connectors.sources.whatsapp import WhatsAppSource
from tests.generate_exports import WRITERS, write_jsonl
from tests.helpers import REPO, SAMPLES
from topics.records import Content, NetworkMessage, PortalInfo, Sender

# Modest sizes keep the suite fast; 10x is what matters for spotting O(n) memory.
SMALL, LARGE = 2_000, 20_000


@pytest.fixture(scope="module")
def media_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wa") / "WhatsApp Chat - Trip.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in (SAMPLES / "whatsapp" / "zip_media").iterdir():
            zf.write(f, f.name)
    return path


def test_all_importers_are_registered() -> None:
    found = available()
    assert {"whatsapp", "slack", "telegram", "csv", "jsonl"} <= set(found)
    assert found["whatsapp"] is WhatsAppSource


@pytest.mark.parametrize(
    ("sample", "kinds"),
    [
        ("WhatsApp Chat with Alice.txt", {"text", "notice", "location"}),
        ("WhatsApp Chat with Family.txt", {"text", "notice"}),
        ("WhatsApp Chat - Book Club.txt", {"text", "notice"}),
    ],
)
def test_whatsapp_samples(sample: str, kinds: set[str]) -> None:
    report = check_source(lambda: WhatsAppSource(SAMPLES / "whatsapp" / sample), kinds)
    assert report.rejected == []


def test_whatsapp_zip(media_zip: Path) -> None:
    check_source(lambda: WhatsAppSource(media_zip), {"text", "media", "notice"})


def test_slack_sample() -> None:
    report = check_source(
        lambda: SlackSource(SAMPLES / "slack"), {"text", "notice", "emote", "reaction"}
    )
    assert len(report.rejected) == 1  # the message without ts, on purpose


def test_telegram_samples() -> None:
    check_source(
        lambda: TelegramSource(SAMPLES / "telegram" / "single"),
        {"text", "notice", "media", "location"},
    )
    check_source(lambda: TelegramSource(SAMPLES / "telegram" / "full"), {"text"})


def test_csv_example() -> None:
    report = check_source(lambda: CsvSource(SAMPLES / "csv" / "history.csv"), {"text"})
    assert [r.where for r in report.rejected] == ["history.csv:6"]
    bodies = [r.content.body for r in report.records if isinstance(r, NetworkMessage)]
    assert bodies == ["Happy new year!", "Same to you, Alice", "Multi-line\nbody"]
    assert report.records[2].ts == 1_704_058_920_000


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, 50)
    check_source(lambda: JsonlSource(path), {"text"}, allow_rejected=False)


# The encrypted Signal backups need their passphrase or key: their own memory
# tests (tests/connectors/sources/test_signal_backup*.py) run them.
@pytest.mark.parametrize("fmt", sorted(set(WRITERS) - {"signal-backup", "signal-backup-v2"}))
def test_streaming_memory(fmt: str, tmp_path: Path) -> None:
    source_class = available()[fmt]

    def make(n: int) -> Source:
        folder = tmp_path / str(n)
        folder.mkdir(exist_ok=True)
        return source_class(WRITERS[fmt](folder, n))

    assert_streaming_memory(make, SMALL, LARGE)


# ---------------------------------------------------------------- the kit catches bad connectors


class _Bad(Source):
    """A deliberately broken source; each flag switches on one defect."""

    name = "bad"
    network = "bad"

    def read(self) -> Iterator[SourceItem]:
        flags = self.options
        n = int(flags.get("n", "10"))
        if not flags.get("no_portal"):
            yield PortalInfo(self.network, "p", name=None if flags.get("unnamed") else "P")
        messages = [
            NetworkMessage(
                self.network,
                "p",
                id=uuid.uuid4().hex if flags.get("unstable") else f"m{i}",
                sender=Sender("s"),
                ts=1_700_000_000 if flags.get("seconds") else 1_700_000_000_000 + i,
                content=Content(kind="media", media_type="image", url="mxc://x/y", html="<b>")
                if flags.get("invalid")
                else Content(kind="text", body="x" * 50),
            )
            for i in range(n)
        ]
        yield from messages  # holds everything: O(n) memory


@pytest.mark.parametrize(
    ("flag", "check", "message"),
    [
        ("unstable", lambda make: assert_ids_stable(make), "ids differ"),
        ("seconds", lambda make: assert_timestamps_sane(collect(make())[0]), "before 2000"),
        ("no_portal", lambda make: assert_portal_metadata(collect(make())[0]), "before any"),
        ("unnamed", lambda make: assert_portal_metadata(collect(make())[0]), "without a name"),
        ("invalid", lambda make: assert_valid_records(collect(make())[0]), "does not survive"),
    ],
)
def test_kit_catches_defects(flag: str, check, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check(lambda: _Bad(Path("."), {flag: "1"}))


def test_kit_catches_missing_kinds_and_memory_growth() -> None:
    with pytest.raises(AssertionError, match="not produced"):
        assert_content_kinds(collect(_Bad(Path(".")))[0], {"text", "media"})
    with pytest.raises(AssertionError, match="memory grows"):
        assert_streaming_memory(lambda n: _Bad(Path("."), {"n": str(n)}), SMALL, LARGE)


def test_guide_shows_the_example_source_verbatim() -> None:
    guide = (REPO / "docs" / "connectors.md").read_text()
    code = (REPO / "connectors/sources/example_csv.py").read_text()
    assert f"```python\n{code}```" in guide
