"""WhatsApp export parsing: layouts, dates, system lines, media and hostile archives."""

from __future__ import annotations

import base64
import shutil
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from connectors.conformance import messages, run
from connectors.source import Rejected, SourceError
from connectors.sources.whatsapp import (
    MAX_INLINE_BYTES,
    MAX_LINE_BYTES,
    MAX_MESSAGE_BYTES,
    SYSTEM_SENDER,
    WhatsAppSource,
    portal_id,
    sender_id,
)
from tests.helpers import SAMPLES as SAMPLES_DIR
from tests.helpers import traced_peak
from topics.records import Content, PortalInfo, Sender

SAMPLES = SAMPLES_DIR / "whatsapp"
ALICE = Sender(sender_id("Alice"), "Alice")
BOB = Sender(sender_id("Bob"), "Bob")


def ms(*args: int, tz: str = "UTC") -> int:
    return int(datetime(*args, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def read(path: Path, **options: str) -> tuple[list, list[Rejected], WhatsAppSource]:
    return run(WhatsAppSource, path, **options)  # type: ignore[return-value]


def summary(records: list) -> list[tuple]:
    return [(m.sender.name, m.ts, m.content.kind, m.content.body) for m in messages(records)]


def zip_dir(src: Path, dest: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest


def test_android_12h_month_first() -> None:
    records, rejected, source = read(SAMPLES / "WhatsApp Chat with Alice.txt")
    assert rejected == []
    portal = portal_id("Alice")
    assert records[0] == PortalInfo("whatsapp", portal, name="Alice")
    assert summary(records) == [
        ("Alice", ms(2023, 12, 31, 21, 41), "text", "hi"),
        ("Bob", ms(2023, 12, 31, 21, 41) + 1, "text", "happy new year\nalmost!"),
        ("Alice", ms(2023, 12, 31, 23, 59), "notice", "Media omitted"),
        ("Bob", ms(2024, 1, 1, 0, 0), "text", "🎉"),
        ("Bob", ms(2024, 1, 1, 0, 0) + 1, "text", "🎉"),
        ("WhatsApp", ms(2024, 1, 13, 12, 30), "notice", "Alice added +49 151 2345678"),
        ("+49 151 2345678", ms(2024, 1, 13, 12, 31), "text", "thanks"),
        (
            "Alice",
            ms(2024, 1, 13, 12, 33),
            "location",
            "location: https://maps.google.com/?q=52.52,13.405",
        ),
    ]
    msgs = messages(records)
    # Identical repeats in one minute still get distinct ids.
    assert msgs[3].id != msgs[4].id
    assert msgs[5].sender == SYSTEM_SENDER
    assert msgs[6].sender.id == "+491512345678"
    assert (msgs[7].content.lat, msgs[7].content.lon) == (52.52, 13.405)
    final = records[-1]
    assert isinstance(final, PortalInfo) and final.portal == portal
    assert [m.name for m in final.members] == ["Alice", "Bob", "+49 151 2345678"]
    # The encryption banner and the deleted message are skipped.
    assert source.stats["skipped"] == 2


def test_android_24h_day_first_with_timezone_and_multiline() -> None:
    records, rejected, source = read(
        SAMPLES / "WhatsApp Chat with Family.txt", tz="Europe/Berlin", portal="family"
    )
    assert rejected == []
    berlin = "Europe/Berlin"
    assert summary(records) == [
        ("WhatsApp", ms(2023, 12, 31, 21, 41, tz=berlin), "notice", 'Alice created group "Family"'),
        (
            "Alice",
            ms(2023, 12, 31, 21, 41, tz=berlin) + 1,
            "text",
            "Line one\nline two\n\nline four",
        ),
        (
            "Bob",
            ms(2023, 12, 31, 21, 42, tz=berlin),
            "notice",
            "IMG-20231231-WA0001.jpg (file not included in the export)",
        ),
        ("Carol", ms(2024, 1, 1, 0, 0, tz=berlin), "text", "happy new year"),
    ]
    assert ms(2023, 12, 31, 21, 41, tz=berlin) == ms(2023, 12, 31, 20, 41)
    assert {m.portal for m in messages(records)} == {"family"}
    assert source.stats["media_missing"] == 1


def test_ios_marks_and_narrow_spaces() -> None:
    records, rejected, _ = read(SAMPLES / "WhatsApp Chat - Book Club.txt")
    assert rejected == []
    assert records[0].name == "Book Club"
    assert summary(records) == [
        ("WhatsApp", ms(2023, 12, 31, 21, 41, 5), "notice", "Alice created group “Book Club”"),
        ("Alice", ms(2023, 12, 31, 21, 41, 7), "text", "Welcome!"),
        ("Bob", ms(2023, 12, 31, 21, 42), "notice", "image omitted"),
        ("Alice", ms(2024, 1, 13, 0, 0), "text", "midnight"),
    ]


def test_ambiguous_dates_default_day_first_and_option() -> None:
    records, _, source = read(SAMPLES / "ambiguous.txt")
    assert [m.ts for m in messages(records)] == [ms(2024, 2, 1, 10), ms(2024, 4, 3, 10)]
    (warning,) = source.warnings
    assert "date order is a guess, dmy" in warning and "-o date_order=mdy|dmy|ymd" in warning
    records, _, source = read(SAMPLES / "ambiguous.txt", date_order="mdy")
    assert [m.ts for m in messages(records)] == [ms(2024, 1, 2, 10), ms(2024, 3, 4, 10)]
    assert source.warnings == []


def test_conflicting_dates_name_the_file() -> None:
    with pytest.raises(SourceError, match=r"conflicting\.txt: conflicting dates"):
        read(SAMPLES / "conflicting.txt")
    # An explicit order wins; the line that cannot be a date is rejected.
    records, rejected, _ = read(SAMPLES / "conflicting.txt", date_order="dmy")
    assert [m.content.body for m in messages(records)] == ["day first"]
    assert [r.where for r in rejected] == ["conflicting.txt:2"]


def test_unknown_layout_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    header = "01/02/2024, 10:00 - A: hi\n"  # too far in to decide the layout
    path.write_text("\nHello, this is a shopping list\n" + "eggs\n" * 300 + header)
    with pytest.raises(SourceError, match=r"list\.txt:2: unknown date layout: 'Hello, this"):
        read(path)


def test_a_first_line_that_is_not_a_message_does_not_decide_the_layout() -> None:
    records, rejected, _ = read(SAMPLES / "not_an_export.txt")
    assert [m.content.body for m in messages(records)] == ["hi"]
    assert [(r.where, r.reason) for r in rejected] == [
        ("not_an_export.txt:1", "text before the first message header")
    ]


def test_bad_options() -> None:
    with pytest.raises(SourceError, match="unknown time zone"):
        read(SAMPLES / "ambiguous.txt", tz="Mars/Olympus")
    with pytest.raises(SourceError, match="date_order"):
        read(SAMPLES / "ambiguous.txt", date_order="ydm")
    with pytest.raises(SourceError, match="no such file"):
        read(SAMPLES / "missing.txt")


def test_invalid_utf8_line_is_rejected_and_parsing_continues(tmp_path: Path) -> None:
    path = tmp_path / "chat.txt"
    path.write_bytes(
        b"01/02/2024, 10:00 - Alice: fine\n"
        b"01/02/2024, 10:01 - Bob: bad \xff\xfe bytes\n"
        b"01/02/2024, 10:02 - Alice: still fine\n"
    )
    records, rejected, _ = read(path)
    assert [m.content.body for m in messages(records)] == ["fine", "still fine"]
    assert len(rejected) == 1
    assert rejected[0].where == "chat.txt:2"
    assert rejected[0].reason == "invalid UTF-8"
    assert "bad" in rejected[0].original


def test_ids_stable_across_reads_and_overlapping_exports(tmp_path: Path) -> None:
    full = SAMPLES / "WhatsApp Chat with Alice.txt"
    first = [m.id for m in messages(read(full)[0])]
    assert first == [m.id for m in messages(read(full)[0])]
    # A later export of the same chat that starts further in repeats the same ids.
    later = tmp_path / "WhatsApp Chat with Alice.txt"
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    later.write_text("".join(lines[5:]) + "1/14/24, 9:00 AM - Bob: new\n", encoding="utf-8")
    again = [m.id for m in messages(read(later)[0])]
    assert again[:-1] == first[3:]
    assert again[-1] not in first


def test_zip_with_attached_media(tmp_path: Path) -> None:
    big = b"x" * (MAX_INLINE_BYTES + 1)
    archive = zip_dir(
        SAMPLES / "zip_media",
        tmp_path / "WhatsApp Chat - Trip.zip",
        {"00000014-PHOTO-2023-12-31-21-45-00.jpg": big},
    )
    records, rejected, source = read(archive)
    assert rejected == []
    assert records[0] == PortalInfo("whatsapp", portal_id("Trip"), name="Trip")
    msgs = messages(records)
    assert [m.content.kind for m in msgs] == ["text", "media", "media", "notice"]
    photo, audio, too_big = msgs[1].content, msgs[2].content, msgs[3].content
    assert photo == Content(
        kind="media",
        media_type="image",
        body="00000012-PHOTO-2023-12-31-21-43-00.jpg",
        filename="00000012-PHOTO-2023-12-31-21-43-00.jpg",
        mimetype="image/jpeg",
        size=18,
        data=base64.b64encode(b"not really a jpeg\n").decode(),
    )
    assert (audio.media_type, audio.mimetype) == ("audio", "audio/ogg")
    assert "too large" in too_big.body
    assert msgs[1].ts == ms(2023, 12, 31, 21, 43)
    assert source.stats["media"] == 2
    assert source.stats["media_too_large"] == 1


def test_txt_alone_finds_media_beside_it(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(SAMPLES / "zip_media", folder)
    records, _, source = read(folder / "_chat.txt")
    assert [m.content.kind for m in messages(records)] == ["text", "media", "media", "notice"]
    assert source.stats["media_missing"] == 1


def test_hostile_zip_entries_are_refused_and_never_extracted(tmp_path: Path) -> None:
    archive = tmp_path / "WhatsApp Chat with Eve.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(
            "_chat.txt",
            "01/02/2024, 10:00 - Eve: <attached: ../evil.txt>\n"
            "01/02/2024, 10:01 - Eve: /etc/passwd.txt (file attached)\n",
        )
        zf.writestr("../evil.txt", "pwned")
        zf.writestr("/abs.txt", "pwned")
    records, rejected, _ = read(archive)
    assert sorted(r.original for r in rejected) == ["../evil.txt", "/abs.txt"]
    assert all("unsafe path" in r.reason for r in rejected)
    assert [m.content.kind for m in messages(records)] == ["notice", "notice"]
    assert not (tmp_path.parent / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_truncated_zip_is_a_source_error(tmp_path: Path) -> None:
    good = zip_dir(SAMPLES / "zip_media", tmp_path / "good.zip")
    broken = tmp_path / "WhatsApp Chat with Bob.zip"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SourceError, match=r"WhatsApp Chat with Bob\.zip"):
        read(broken)


def test_zip_without_chat_text(tmp_path: Path) -> None:
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.jpg", b"1")
    with pytest.raises(SourceError, match="expected one chat text file"):
        read(archive)


def test_timestamps_are_utc_ms() -> None:
    records, _, _ = read(SAMPLES / "ambiguous.txt", tz="America/New_York")
    first = messages(records)[0]
    assert first.ts == int(datetime(2024, 2, 1, 15, tzinfo=UTC).timestamp() * 1000)
    assert first.sender == ALICE
    assert messages(records)[1].sender == BOB


def _traced_read(path: Path) -> tuple[list, list[Rejected], int]:
    (records, rejected, _), peak = traced_peak(lambda: read(path))
    return records, rejected, peak


def test_endless_line_in_a_zip_is_rejected_with_memory_bounded(tmp_path: Path) -> None:
    """A small zip holding one 60 MB line (a decompression bomb): one rejection, flat memory."""
    archive = tmp_path / "WhatsApp Chat with Alice.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(
            "WhatsApp Chat with Alice.txt",
            b"01/02/2024, 10:00 - Alice: before\n"
            + b"01/02/2024, 10:01 - Bob: "
            + b"x" * 60_000_000
            + b"\n"
            + b"01/02/2024, 10:02 - Alice: after\n",
        )
    assert archive.stat().st_size < 1_000_000
    records, rejected, peak = _traced_read(archive)
    assert [m.content.body for m in messages(records)] == ["before", "after"]
    assert [(r.where, r.reason) for r in rejected] == [
        ("WhatsApp Chat with Alice.txt:2", f"line over {MAX_LINE_BYTES} bytes: not read")
    ]
    assert peak < 8 * MAX_LINE_BYTES, peak


def test_endless_continuation_ends_the_message_not_the_import(tmp_path: Path) -> None:
    path = tmp_path / "chat.txt"
    with path.open("wb") as f:
        f.write(b"01/02/2024, 10:00 - Alice: start\n")
        f.write((b"y" * 99 + b"\n") * 200_000)  # 20 MB of continuation lines
        f.write(b"01/02/2024, 10:02 - Bob: next\n")
    records, rejected, peak = _traced_read(path)
    assert [m.content.body for m in messages(records)] == ["next"]
    assert [(r.where, r.reason) for r in rejected] == [
        ("chat.txt:1", f"message over {MAX_MESSAGE_BYTES} bytes: not imported")
    ]
    assert peak < 4 * MAX_MESSAGE_BYTES, peak


def test_rejected_header_ends_the_message_before_it(tmp_path: Path) -> None:
    """Lines after a header that was refused are never glued onto someone else's message."""
    lines = [
        "01/02/2024, 10:00 - Alice: mine",
        "01/02/2024, 25:61 - Bob: his, with a bad time",
        "and his second line",
        "01/02/2024, 10:02 - Alice: mine again",
    ]
    records, rejected, _ = read(_chat(tmp_path, "chat.txt", lines))
    assert summary(records) == [
        ("Alice", ms(2024, 2, 1, 10, 0), "text", "mine"),
        ("Alice", ms(2024, 2, 1, 10, 2), "text", "mine again"),
    ]
    assert [(r.where, r.reason.split(":")[0]) for r in rejected] == [
        ("chat.txt:2", "invalid date or time"),
        ("chat.txt:3", "continues the rejected message at line 2"),
    ]


def test_undecodable_header_ends_the_message_before_it(tmp_path: Path) -> None:
    path = tmp_path / "chat.txt"
    path.write_bytes(
        b"01/02/2024, 10:00 - Alice: mine\n01/02/2024, 10:01 - Bob: \xff\nhis second line\n"
    )
    records, rejected, _ = read(path)
    assert [m.content.body for m in messages(records)] == ["mine"]
    assert [(r.where, r.reason) for r in rejected] == [
        ("chat.txt:2", "invalid UTF-8"),
        ("chat.txt:3", "continues the rejected message at line 2"),
    ]


def test_text_before_the_first_header_is_rejected_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "chat.txt"
    path.write_bytes(b"...the end of an earlier message\n\n01/02/2024, 10:00 - Alice: hi\n")
    records, rejected, _ = read(path)
    assert [m.content.body for m in messages(records)] == ["hi"]
    assert [(r.where, r.reason) for r in rejected] == [
        ("chat.txt:1", "text before the first message header")
    ]


def _flag_central_entry(archive: Path, name: str, offset: int, value: int) -> None:
    data = bytearray(archive.read_bytes())
    record = data.rindex(name.encode()) - 46  # the central directory record of ``name``
    assert data[record : record + 4] == b"PK\x01\x02"
    data[record + offset] |= value
    archive.write_bytes(bytes(data))


def test_encrypted_media_entry_becomes_a_notice(tmp_path: Path) -> None:
    archive = tmp_path / "WhatsApp Chat with Alice.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(
            "WhatsApp Chat with Alice.txt",
            "01/02/2024, 10:00 - Alice: IMG-1.jpg (file attached)\n",
        )
        zf.writestr("IMG-1.jpg", b"\xff\xd8\xff" + b"\0" * 100)
    _flag_central_entry(archive, "IMG-1.jpg", 8, 0x1)
    records, rejected, source = read(archive)
    (msg,) = messages(records)
    assert msg.content.kind == "notice"
    assert "encrypted zip entry" in msg.content.body
    assert source.stats["media_refused"] == 1


def test_chat_text_in_an_unreadable_entry_is_a_source_error(tmp_path: Path) -> None:
    archive = tmp_path / "WhatsApp Chat with Alice.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("WhatsApp Chat with Alice.txt", "01/02/2024, 10:00 - Alice: hi\n")
    _flag_central_entry(archive, "WhatsApp Chat with Alice.txt", 10, 9)  # Deflate64
    with pytest.raises(SourceError, match="compression method 9"):
        read(archive)


LOCALES = SAMPLES / "locales"
_FIRST_SECOND = [("Ann", "first"), ("Bo", "second")]


@pytest.mark.parametrize(
    "sample, first, second, options",
    [
        ("ios old 12h", (2016, 7, 1, 16, 56, 55), (2016, 7, 2, 9, 5, 1), {}),
        ("ios old 24h", (2015, 6, 13, 10, 59, 59), (2015, 6, 14, 8, 0), {}),
        ("arabic", (2023, 12, 31, 21, 41), (2024, 1, 1, 0, 5), {}),
        ("time first", (2022, 3, 18, 14, 56, 1), (2022, 3, 19, 9, 0), {}),
        ("buddhist", (2022, 12, 31, 21, 41), (2023, 1, 1, 8, 0), {}),
        ("finnish", (2018, 6, 13, 21, 25, 15), (2018, 6, 14, 8, 0), {}),
        ("croatian", (2018, 6, 13, 21, 25, 15), (2018, 6, 14, 8, 0), {}),
        ("dots in times", (2018, 6, 13, 14, 31), (2018, 6, 14, 8, 0), {}),
        ("month day", (2023, 3, 5, 20, 11), (2023, 3, 6, 8, 0), {"year": "2023"}),
        ("day month", (2023, 3, 18, 12, 14), (2023, 3, 19, 8, 0), {"year": "2023"}),
        ("hour zero", (2020, 1, 2, 12, 24), (2020, 1, 3, 0, 8), {}),
        ("chinese", (2023, 12, 31, 21, 41), (2024, 1, 1, 8, 0), {}),
    ],
)
def test_header_layouts_of_other_locales(
    sample: str, first: tuple, second: tuple, options: dict[str, str]
) -> None:
    records, rejected, _ = read(LOCALES / f"WhatsApp Chat with Ann ({sample}).txt", **options)
    assert rejected == []
    got = [(m.sender.name, m.ts, m.content.body.split("\n")[0]) for m in messages(records)]
    assert got == [
        ("Ann", ms(*first), "first"),
        ("Bo", ms(*second), "second"),
    ]


def test_old_ios_layout_keeps_phone_number_senders_and_continuations() -> None:
    records, rejected, _ = read(LOCALES / "WhatsApp Chat with Ann (ios old phone).txt")
    assert rejected == []
    assert summary(records) == [
        ("+55 61 8121-3457", ms(2016, 4, 26, 16, 23, 3), "notice", "image omitted"),
        ("Ann", ms(2016, 4, 27, 8), "text", "second"),
    ]
    records, _, _ = read(LOCALES / "WhatsApp Chat with Ann (ios old 12h).txt")
    assert [m.content.body for m in messages(records)] == ["first", "second\nstill Bo"]


def test_a_file_starting_without_a_date_still_imports() -> None:
    records, rejected, _ = read(LOCALES / "WhatsApp Chat with Ann (starts without date).txt")
    assert [m.content.body for m in messages(records)] == ["first", "second"]
    assert [(r.where, r.reason) for r in rejected] == [
        (
            "WhatsApp Chat with Ann (starts without date).txt:1",
            "text before the first message header",
        )
    ]


def _chat(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_july_in_month_first_12_hour_dates_is_not_read_as_january_to_november(
    tmp_path: Path,
) -> None:
    """Every date fits both orders; the 12-hour clock with unpadded dates says month first."""
    lines = [
        f"7/{day}/17, {h}:14 {ap} - Ann: day {day}"
        for day in range(1, 12)
        for h, ap in ((12, "AM"), (2, "PM"))
    ]
    records, rejected, source = read(_chat(tmp_path, "chat.txt", lines))
    assert rejected == []
    stamps = [m.ts for m in messages(records)]
    assert stamps[0] == ms(2017, 7, 1, 0, 14) and stamps[-1] == ms(2017, 7, 11, 14, 14)
    (warning,) = source.warnings
    assert "guess, mdy" in warning and "-o date_order=mdy|dmy|ymd" in warning


def test_time_going_backwards_rules_an_order_out_without_a_warning(tmp_path: Path) -> None:
    # Month first: Jan 2, Mar 2, Feb 3 goes back a month. Day first: Feb 1, Feb 3, Mar 2.
    lines = ["1/2/20, 10:00 - Ann: a", "3/2/20, 10:00 - Bo: b", "2/3/20, 10:00 - Ann: c"]
    records, _, source = read(_chat(tmp_path, "chat.txt", lines))
    assert [m.ts for m in messages(records)] == [
        ms(2020, 2, 1, 10),
        ms(2020, 2, 3, 10),
        ms(2020, 3, 2, 10),
    ]
    assert source.warnings == []


def test_month_names_without_a_year_count_back_from_the_export_date(tmp_path: Path) -> None:
    import os

    path = _chat(
        tmp_path,
        "chat.txt",
        [
            "Dec 30, 8:11 PM - Ann: old year",
            "Jan 2, 9:00 AM - Bo: new year",
        ],
    )
    written = datetime(2024, 3, 1, tzinfo=UTC).timestamp()
    os.utime(path, (written, written))
    records, _, source = read(path)
    assert [m.ts for m in messages(records)] == [ms(2023, 12, 30, 20, 11), ms(2024, 1, 2, 9)]
    (warning,) = source.warnings
    assert "no year" in warning and "-o year=YYYY" in warning


def test_unzipped_ios_chats_do_not_merge_into_one_portal(tmp_path: Path) -> None:
    """Every unzipped iOS export is called _chat.txt: the folder names the chat."""
    line = "[1/3/20, 10:00:00] {}: hi"
    alice = _chat(tmp_path, "WhatsApp Chat - Alice/_chat.txt", [line.format("Alice")])
    bob = _chat(tmp_path, "WhatsApp Chat - Bob/_chat.txt", [line.format("Bob")])
    portals = {read(p)[0][0].portal for p in (alice, bob)}
    assert portals == {portal_id("Alice"), portal_id("Bob")}
    assert read(alice)[0][0].name == "Alice"


def test_ios_chat_without_a_title_is_named_by_its_own_system_line(tmp_path: Path) -> None:
    lines = [
        "[1/3/20, 10:00:00] Family: \u200eMessages and calls are end-to-end encrypted.",
        "[1/3/20, 10:01:00] Family: \u200eYour security code with Bob changed.",
        "[1/3/20, 10:02:00] Bob: hi",
    ]
    records, _, source = read(_chat(tmp_path, "export/_chat.txt", lines))
    assert records[0].portal == portal_id("Family") and records[0].name == "Family"
    assert summary(records) == [
        ("WhatsApp", ms(2020, 3, 1, 10, 1), "notice", "Your security code with Bob changed."),
        ("Bob", ms(2020, 3, 1, 10, 2), "text", "hi"),
    ]
    assert not any("portal id" in w for w in source.warnings)


def test_chat_without_any_title_hashes_its_participants(tmp_path: Path) -> None:
    one = _chat(tmp_path, "a/_chat.txt", ["[1/3/20, 10:00:00] Ann: hi"])
    two = _chat(tmp_path, "b/a/_chat.txt", ["[1/3/20, 10:00:00] Bo: hi"])
    (first, _, source), (second, _, _) = read(one), read(two)
    assert first[0].portal != second[0].portal
    assert any("-o portal=ID" in w for w in source.warnings)
    assert read(one, portal="fam")[0][0].portal == "fam"


def test_empty_message_is_rejected_with_file_and_line(tmp_path: Path) -> None:
    path = _chat(tmp_path, "chat.txt", ["01/02/2024, 10:00 - Ann: ", "01/02/2024, 10:01 - Bo: ok"])
    records, rejected, _ = read(path)
    assert [m.content.body for m in messages(records)] == ["ok"]
    assert [(r.where, r.reason) for r in rejected] == [
        ("chat.txt:1", "empty message: a header with no text after the name")
    ]


@pytest.mark.parametrize(
    "line, kind, body",
    [
        ("IMG-1.jpg (Datei angehängt)", "media", "IMG-1.jpg"),
        ("IMG-1.jpg (bestand bijgevoegd)", "media", "IMG-1.jpg"),
        ("IMG-1.jpg (fichier rattaché)", "media", "IMG-1.jpg"),  # unknown words, file present
        ("IMG-2.jpg (fichier rattaché)", "text", "IMG-2.jpg (fichier rattaché)"),  # no such file
        ("< attached: IMG-1.jpg >", "media", "IMG-1.jpg"),
        ("\u2039attached: IMG-1.jpg>", "media", "IMG-1.jpg"),
        ("<Medien weggelassen>", "notice", "Medien weggelassen"),
        ("<Media omitted>\nlook at this", "notice", "Media omitted\nlook at this"),
    ],
)
def test_attachments_and_omitted_media_in_other_locales(
    tmp_path: Path, line: str, kind: str, body: str
) -> None:
    archive = tmp_path / "WhatsApp Chat with Ann.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("WhatsApp Chat with Ann.txt", f"01/02/2024, 10:00 - Ann: {line}\n")
        zf.writestr("IMG-1.jpg", b"\xff\xd8\xff" + b"\0" * 10)
    records, rejected, _ = read(archive)
    assert rejected == []
    (m,) = messages(records)
    assert (m.content.kind, m.content.body) == (kind, body)


@pytest.mark.parametrize("sibling_date, order", [("13/06/2024", "dmy"), ("06/13/2024", "mdy")])
def test_a_chat_exported_beside_decides_an_ambiguous_order(
    tmp_path: Path, sibling_date: str, order: str
) -> None:
    """Exports from one phone share its locale: a sibling .txt with a telling date decides."""
    chat = _chat(tmp_path, "chat.txt", ["01/02/2024, 10:00 - Ann: a", "03/04/2024, 10:00 - Bo: b"])
    _chat(tmp_path, "other.txt", [f"{sibling_date}, 09:00 - Cy: c"])
    records, _, source = read(chat)
    first = ms(2024, 2, 1, 10) if order == "dmy" else ms(2024, 1, 2, 10)
    assert messages(records)[0].ts == first
    (warning,) = source.warnings
    assert f"date order ({order}) comes from other chats" in warning
