"""The hostile corpus through each importer: WhatsApp, Slack, Telegram and CSV.

Two tables, both generated here:

- strings: a NUL, terminal controls, a bidi override in each field an
  importer reads, in the middle one of three messages;
- archives: zip-slip names, links out of the export, decompression bombs,
  truncated and invalid UTF-8 files, deep nesting, encrypted entries, media
  paths that climb out.

Records are checked as the publisher checks them (``check_record``), so
what is accepted here is what an import publishes. For each case: the bad
input is one rejection naming the file and line or entry (and the field),
the neighbours still import, nothing outside the export is read, and the
traced peak memory stays bounded whatever the input expands to.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from connectors.publish import check_record
from connectors.source import Rejected, Source, SourceError
from connectors.sources.example_csv import CsvSource
from connectors.sources.slack import SlackSource
from connectors.sources.telegram import TelegramSource
from connectors.sources.whatsapp import WhatsAppSource
from tests.helpers import traced_peak
from tests.hostile.corpus import NASTY
from topics.codec import RecordError
from topics.records import NetworkMessage

SECRET = "BACKFLOW_HOSTILE_SECRET"
# Caps lowered for speed (fixture the_caps); bombs expand beyond the peak allowed.
CAP = 4 * 1024 * 1024
PEAK_LIMIT = 16 * 1024 * 1024
BOMB = 24 * 1024 * 1024


@dataclass
class Outcome:
    bodies: list[str]  # message bodies that would be published, in order
    rejected: list[tuple[str, str]]  # (where, reason)
    text: str  # everything published, for leak checks
    error: str | None = None  # the SourceError that ended the input, if any


def validated(source: Source) -> Outcome:
    """Read a source as ``publish_source`` does: its rejections plus the codec's."""
    bodies: list[str] = []
    rejected: list[tuple[str, str]] = []
    text: list[str] = []
    try:
        for n, item in enumerate(source.read(), start=1):
            _take(source, n, item, bodies, rejected, text)
    except SourceError as exc:
        return Outcome(bodies, rejected, "\n".join(text), str(exc))
    return Outcome(bodies, rejected, "\n".join(text))


def _take(
    source: Source,
    n: int,
    item: object,
    bodies: list[str],
    rejected: list[tuple[str, str]],
    text: list[str],
) -> None:
    if isinstance(item, Rejected):
        rejected.append((item.where, item.reason))
        return
    try:
        record, data = check_record(item, source.decoded)  # type: ignore[arg-type]
    except RecordError as exc:
        where = source.at if isinstance(item, NetworkMessage) else None
        rejected.append((where or f"{source.path.name} item {n}", str(exc)))
        return
    text.append(data.decode())
    if isinstance(record, NetworkMessage):
        bodies.append(record.content.body or "")


def measured(source: Source) -> tuple[Outcome, int]:
    outcome, peak = traced_peak(lambda: validated(source))
    assert peak < PEAK_LIMIT, f"peak {peak / 1e6:.0f} MB"
    assert SECRET not in outcome.text  # nothing outside the export was read
    return outcome, peak


# ---------------------------------------------------------------- builders


def slack_zip(path: Path, days: dict[str, bytes | str], **extra: bytes | str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("users.json", '[{"id": "U1", "name": "ann"}]')
        zf.writestr("channels.json", '[{"id": "C1", "name": "c"}]')
        for day, data in days.items():
            zf.writestr(f"c/{day}.json", data)
        for name, data in extra.items():
            zf.writestr(name.replace("__", "/"), data)
    return path


def slack_day(*texts: str, field: str = "text", value: object = None) -> str:
    msgs: list[dict[str, object]] = [
        {"type": "message", "user": "U1", "text": t, "ts": f"170424000{i}.000100"}
        for i, t in enumerate(texts)
    ]
    if value is not None:
        msgs[1][field] = value
    return json.dumps(msgs)


def telegram_export(root: Path, msgs: list[dict[str, object]], **chat: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {"name": "chat", "type": "personal_chat", "id": 42, "messages": msgs, **chat}
    (root / "result.json").write_text(json.dumps(data))
    return root


def telegram_message(i: int, **fields: object) -> dict[str, object]:
    base = {"id": i, "type": "message", "date_unixtime": str(1704058800 + i), "from": "A"}
    return {**base, "from_id": "user1", "text": f"t{i}", **fields}


def whatsapp_lines(middle: str) -> bytes:
    return (
        "01/02/2024, 10:00 - Eve: one\n" + f"01/02/2024, 10:01 - {middle}\n"
        "01/02/2024, 10:02 - Eve: three\n"
    ).encode()


CSV_HEAD = "portal,id,sender,ts,body\n"


# ---------------------------------------------------------------- strings


@dataclass(frozen=True)
class StringCase:
    importer: str
    field: str
    label: str
    build: Callable[[Path, str], Source]
    # (where, field) of the one rejection, or None when the value is carried.
    refused: Callable[[str], tuple[str, str] | None]


def _slack(field: str) -> Callable[[Path, str], Source]:
    def build(tmp: Path, value: str) -> Source:
        day = slack_day("one", "two", "three", field=field, value=value)
        return SlackSource(slack_zip(tmp / "slack.zip", {"2024-01-03": day}))

    return build


def _slack_refused(field: str) -> Callable[[str], tuple[str, str] | None]:
    def refused(label: str) -> tuple[str, str] | None:
        if label == "nul" or (field == "ts" and label != "nul"):
            reason = f"field '{field}'" if label == "nul" else "malformed ts"
            return "c/2024-01-03.json[1]", reason
        return None

    return refused


def _telegram(field: str) -> Callable[[Path, str], Source]:
    def build(tmp: Path, value: str) -> Source:
        msgs = [telegram_message(i) for i in (1, 2, 3)]
        msgs[1][field] = value
        return TelegramSource(telegram_export(tmp / "tg", msgs))

    return build


def _whatsapp(field: str) -> Callable[[Path, str], Source]:
    def build(tmp: Path, value: str) -> Source:
        middle = f"Bob{value}: two" if field == "sender" else f"Bob: two{value}"
        path = tmp / "WhatsApp Chat with Eve.txt"
        path.write_bytes(whatsapp_lines(middle))
        return WhatsAppSource(path)

    return build


def _csv(column: str) -> Callable[[Path, str], Source]:
    def build(tmp: Path, value: str) -> Source:
        row = {"portal": "p", "id": "2", "sender": "s", "body": "two"}
        row[column] += value
        quoted = ",".join('"' + row[c].replace('"', '""') + '"' for c in ("portal", "id", "sender"))
        body = '"' + row["body"].replace('"', '""') + '"'
        path = tmp / "h.csv"
        path.write_text(
            CSV_HEAD + "p,1,s,1700000000000,one\n"
            f"{quoted},1700000000001,{body}\n"
            "p,3,s,1700000000002,three\n",
            encoding="utf-8",
        )
        return CsvSource(path)

    return build


def _refused_if_nul(where: str, field: str) -> Callable[[str], tuple[str, str] | None]:
    return lambda label: (where, f"field '{field}'") if label == "nul" else None


def _carried(label: str) -> None:
    return None


TG_WHERE = "result.json:chat 42 message 2"
STRING_CASES = [
    *(
        StringCase("slack", f, label, _slack(f), _slack_refused(f))
        for f in ("text", "user", "ts", "thread_ts")
        for label in NASTY
    ),
    *(
        StringCase("telegram", f, label, _telegram(f), _refused_if_nul(TG_WHERE, f))
        for f in ("text", "from", "from_id")
        for label in NASTY
    ),
    *(
        StringCase(
            "whatsapp",
            f,
            label,
            _whatsapp(f),
            _refused_if_nul("WhatsApp Chat with Eve.txt:2", "sender.name")
            if f == "sender"
            else _carried,
        )
        for f in ("sender", "body")
        for label in NASTY
    ),
    *(
        StringCase(
            "csv",
            c,
            label,
            _csv(c),
            _refused_if_nul("h.csv:3", {"sender": "sender.id"}.get(c, c))
            if c != "body"
            else _carried,
        )
        for c in ("portal", "id", "sender", "body")
        for label in NASTY
    ),
]


@pytest.mark.parametrize(
    "case", STRING_CASES, ids=[f"{c.importer}.{c.field}={c.label}" for c in STRING_CASES]
)
def test_hostile_strings_in_each_field(case: StringCase, tmp_path: Path) -> None:
    outcome, _ = measured(case.build(tmp_path, NASTY[case.label]))
    expected = case.refused(case.label)
    message_rejections = [r for r in outcome.rejected if "item" not in r[0]]
    if expected is None:
        assert not outcome.rejected, outcome.rejected
        assert len(outcome.bodies) == 3
    else:
        where, reason = expected
        assert len(message_rejections) == 1, outcome.rejected
        assert message_rejections[0][0] == where and reason in message_rejections[0][1]
        assert len(outcome.bodies) == 2  # both neighbours
    assert outcome.bodies[0].endswith(("one", "t1")) and outcome.bodies[-1].endswith(
        ("three", "t3")
    )


# ---------------------------------------------------------------- archives


@dataclass(frozen=True)
class ArchiveCase:
    name: str
    build: Callable[[Path], Source]
    rejected: list[tuple[str, str]]  # (where, reason fragment), in order
    bodies: list[str] | None = None  # the neighbours that still import
    source_error: str | None = None  # the whole input refused with this


def _secret(tmp: Path) -> Path:
    path = tmp / "outside" / "secret.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SECRET)
    return path


def wa_zip_slip(tmp: Path) -> Source:
    archive = tmp / "WhatsApp Chat with Eve.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("_chat.txt", whatsapp_lines("Eve: <attached: ../evil.txt>"))
        zf.writestr("../evil.txt", SECRET)
        zf.writestr("/abs.txt", SECRET)
    return WhatsAppSource(archive)


def wa_bomb(tmp: Path) -> Source:
    archive = tmp / "WhatsApp Chat with Eve.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("_chat.txt", whatsapp_lines("Bob: " + "x" * BOMB))
    assert archive.stat().st_size < 1_000_000
    return WhatsAppSource(archive)


def wa_truncated(tmp: Path) -> Source:
    archive = tmp / "WhatsApp Chat with Eve.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("_chat.txt", whatsapp_lines("Bob: two") * 200)
    archive.write_bytes(archive.read_bytes()[:-200])
    return WhatsAppSource(archive)


def wa_invalid_utf8(tmp: Path) -> Source:
    path = tmp / "WhatsApp Chat with Eve.txt"
    path.write_bytes(whatsapp_lines("Bob: two").replace(b"two", b"tw\xff\xfeo"))
    return WhatsAppSource(path)


def wa_symlink(tmp: Path) -> Source:
    path = tmp / "chat" / "WhatsApp Chat with Eve.txt"
    path.parent.mkdir()
    path.write_bytes(whatsapp_lines("Bob: IMG-1.jpg (file attached)"))
    (path.parent / "IMG-1.jpg").symlink_to(_secret(tmp))
    return WhatsAppSource(path)


def slack_slip(tmp: Path) -> Source:
    day = slack_day("one", "two", "three")
    return SlackSource(
        slack_zip(tmp / "s.zip", {"2024-01-03": day}, **{"..__..__c__2024-01-04.json": SECRET})
    )


def slack_bomb(tmp: Path) -> Source:
    bomb = '[{"type": "message", "user": "U1", "ts": "1704240000.1", "text": "' + "x" * BOMB
    days = {"2024-01-02": bomb, "2024-01-03": slack_day("one", "two", "three")}
    return SlackSource(slack_zip(tmp / "s.zip", days))


def slack_truncated_day(tmp: Path) -> Source:
    days = {"2024-01-02": slack_day("a", "b", "c")[:-30], "2024-01-03": slack_day("one", "two")}
    return SlackSource(slack_zip(tmp / "s.zip", days))


def slack_invalid_utf8(tmp: Path) -> Source:
    bad = slack_day("a", "b", "c").encode().replace(b'"b"', b'"\xff\xfe"')
    return SlackSource(
        slack_zip(tmp / "s.zip", {"2024-01-02": bad, "2024-01-03": slack_day("one")})
    )


def slack_deep(tmp: Path) -> Source:
    deep = '[{"type": "message", "user": "U1", "ts": "1704240000.1", "text": "d", "x": '
    deep += "[" * 5000 + "]" * 5000 + "}]"
    days = {"2024-01-02": deep, "2024-01-03": slack_day("one", "two")}
    return SlackSource(slack_zip(tmp / "s.zip", days))


def slack_symlink(tmp: Path) -> Source:
    root = tmp / "slack"
    (root / "c").mkdir(parents=True)
    (root / "users.json").write_text('[{"id": "U1", "name": "ann"}]')
    (root / "channels.json").write_text('[{"id": "C1", "name": "c"}]')
    (root / "c" / "2024-01-03.json").write_text(slack_day("one", "two"))
    outside = _secret(tmp).with_name("day.json")
    outside.write_text(json.dumps([{"user": "U1", "ts": "1704240009.1", "text": SECRET}]))
    (root / "c" / "2024-01-02.json").symlink_to(outside)
    return SlackSource(root)


def slack_truncated_zip(tmp: Path) -> Source:
    archive = slack_zip(tmp / "s.zip", {"2024-01-03": slack_day("one") * 1})
    archive.write_bytes(archive.read_bytes()[:-100])
    return SlackSource(archive)


def tg_media(rel: str) -> Callable[[Path], Source]:
    def build(tmp: Path) -> Source:
        _secret(tmp)
        msgs = [telegram_message(1), telegram_message(2, photo=rel), telegram_message(3)]
        return TelegramSource(telegram_export(tmp / "tg", msgs))

    return build


def tg_symlink(tmp: Path) -> Source:
    root = tmp / "tg"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "p.jpg").symlink_to(_secret(tmp))
    msgs = [telegram_message(1), telegram_message(2, photo="photos/p.jpg"), telegram_message(3)]
    return TelegramSource(telegram_export(root, msgs))


def tg_raw(data: bytes) -> Callable[[Path], Source]:
    def build(tmp: Path) -> Source:
        root = tmp / "tg"
        root.mkdir()
        (root / "result.json").write_bytes(data)
        return TelegramSource(root)

    return build


def _tg_json(*msgs: dict[str, object]) -> bytes:
    return json.dumps({"name": "c", "type": "personal_chat", "id": 42, "messages": msgs}).encode()


TG_OK = _tg_json(telegram_message(1), telegram_message(2), telegram_message(3))


def csv_file(data: bytes) -> Callable[[Path], Source]:
    def build(tmp: Path) -> Source:
        path = tmp / "h.csv"
        path.write_bytes(CSV_HEAD.encode() + data)
        return CsvSource(path)

    return build


def slack_ts(value: str) -> Callable[[Path], Source]:
    def build(tmp: Path) -> Source:
        day = slack_day("one", "two", "three", field="ts", value=value)
        return SlackSource(slack_zip(tmp / "s.zip", {"2024-01-03": day}))

    return build


def tg_date(value: str) -> Callable[[Path], Source]:
    def build(tmp: Path) -> Source:
        msgs = [telegram_message(1), telegram_message(2, date_unixtime=value), telegram_message(3)]
        return TelegramSource(telegram_export(tmp / "tg", msgs))

    return build


def wa_1970(tmp: Path) -> Source:
    path = tmp / "WhatsApp Chat with Eve.txt"
    path.write_bytes(whatsapp_lines("Bob: two").replace(b"01/02/2024, 10:01", b"01/02/1970, 10:01"))
    return WhatsAppSource(path)


TS_REASON = "not Unix milliseconds between 2000 and 2100"
ONE = b"p,1,s,1700000000000,one\n"
THREE = b"p,3,s,1700000000002,three\n"
ARCHIVE_CASES = [
    ArchiveCase(
        "slack.ts-1970",
        slack_ts("1.000001"),
        [("c/2024-01-03.json[1]", TS_REASON)],
        ["one", "three"],
    ),
    ArchiveCase(
        "telegram.ts-year-3000", tg_date("32503680000"), [(TG_WHERE, TS_REASON)], ["t1", "t3"]
    ),
    ArchiveCase("telegram.ts-negative", tg_date("-5"), [(TG_WHERE, TS_REASON)], ["t1", "t3"]),
    ArchiveCase(
        "whatsapp.ts-1970",
        wa_1970,
        [("WhatsApp Chat with Eve.txt:2", TS_REASON)],
        ["one", "three"],
    ),
    ArchiveCase(
        "whatsapp.zip-slip",
        wa_zip_slip,
        [("", "unsafe path"), ("", "unsafe path")],
        ["one", None, "three"],  # type: ignore[list-item]
    ),
    ArchiveCase(
        "whatsapp.bomb",
        wa_bomb,
        [("_chat.txt:2", "line over")],
        ["one", "three"],
    ),
    ArchiveCase("whatsapp.truncated-zip", wa_truncated, [], source_error="Eve.zip"),
    ArchiveCase(
        "whatsapp.invalid-utf8",
        wa_invalid_utf8,
        [("WhatsApp Chat with Eve.txt:2", "invalid UTF-8")],
        ["one", "three"],
    ),
    ArchiveCase("whatsapp.symlink", wa_symlink, [], ["one", None, "three"]),  # type: ignore[list-item]
    # An entry outside the export's layout is not part of it: never opened.
    ArchiveCase("slack.zip-slip", slack_slip, [], ["one", "two", "three"]),
    ArchiveCase(
        "slack.bomb",
        slack_bomb,
        [("c/2024-01-02.json", "")],
        ["one", "two", "three"],
    ),
    ArchiveCase("slack.truncated-day", slack_truncated_day, [("c/2024-01-02.json", "")], None),
    ArchiveCase("slack.invalid-utf8", slack_invalid_utf8, [("c/2024-01-02.json", "")], None),
    ArchiveCase(
        "slack.deep", slack_deep, [("c/2024-01-02.json[0]", "deeper than")], ["one", "two"]
    ),
    ArchiveCase(
        "slack.symlink",
        slack_symlink,
        [("c/2024-01-02.json", "outside the export folder")],
        ["one", "two"],
    ),
    ArchiveCase("slack.truncated-zip", slack_truncated_zip, [], source_error="s.zip"),
    ArchiveCase(
        "telegram.media-climbs-out",
        tg_media("../outside/secret.jpg"),
        [(TG_WHERE, "points outside the export folder")],
        ["t1", "t2", "t3"],  # the caption survives, the media does not
    ),
    ArchiveCase(
        "telegram.media-absolute",
        tg_media("/etc/passwd"),
        [(TG_WHERE, "outside")],
        ["t1", "t2", "t3"],
    ),
    ArchiveCase(
        "telegram.media-nul", tg_media("photos/a\x00b.jpg"), [(TG_WHERE, "'photo'")], ["t1", "t3"]
    ),
    ArchiveCase(
        "telegram.symlink",
        tg_symlink,
        [(TG_WHERE, "outside the export folder")],
        ["t1", "t2", "t3"],
    ),
    ArchiveCase(
        "telegram.truncated",
        tg_raw(TG_OK[:-40]),
        [],
        ["t1", "t2"],
        source_error="result.json: invalid JSON",
    ),
    ArchiveCase(
        "telegram.invalid-utf8",
        tg_raw(TG_OK.replace(b'"t2"', b'"\xff\xfe"')),
        [],
        ["t1"],
        source_error="result.json: invalid JSON",
    ),
    ArchiveCase(
        "telegram.deep",
        tg_raw(TG_OK.replace(b'"t2"', b"[" * 5000 + b"]" * 5000)),
        [("result.json:chat 42", "deeper than")],
        ["t1", "t3"],
    ),
    ArchiveCase(
        "telegram.bomb",
        tg_raw(TG_OK.replace(b'"t2"', b'"' + b"x" * BOMB + b'"')),
        [],
        ["t1"],
        source_error="result.json holds a value over",
    ),
    ArchiveCase(
        "csv.huge-field",
        csv_file(ONE + b'p,2,s,1700000000001,"' + b"x" * 10_000_000 + b'"\n' + THREE),
        [("h.csv:3", "line over 262144 characters")],
        ["one", "three"],
    ),
    ArchiveCase(
        "csv.field-over-csv-limit",
        csv_file(ONE + b'p,2,s,1700000000001,"' + b"x" * 200_000 + b'"\n' + THREE),
        [("h.csv:3", "unreadable row: field larger than field limit")],
        ["one", "three"],
    ),
    ArchiveCase(
        "csv.absurd-ts",
        csv_file(ONE + b"p,2,s,1700000000,seconds\np,9,s,32503680000000,y3000\n" + THREE),
        [("h.csv:3", "field 'ts'"), ("h.csv:4", "field 'ts'")],
        ["one", "three"],
    ),
    ArchiveCase(
        "csv.invalid-utf8",  # documented rule: replaced by U+FFFD, not refused
        csv_file(ONE + b"p,2,s,1700000000001,tw\xff\xfeo\n" + THREE),
        [],
        ["one", "tw\ufffd\ufffdo", "three"],
    ),
    ArchiveCase(
        "csv.short-row",
        csv_file(ONE + b"p,2\n" + THREE),
        [("h.csv:3", "field 'ts'")],
        ["one", "three"],
    ),
]


@pytest.fixture
def the_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Day-file and token caps of 4 MB instead of 64 and 16: same code, faster bombs."""
    import connectors.sources.slack as slack
    import connectors.sources.stream as stream

    monkeypatch.setattr(slack, "MAX_DAY_FILE_BYTES", CAP)
    monkeypatch.setattr(stream, "MAX_TOKEN_BYTES", CAP)


@pytest.mark.parametrize("case", ARCHIVE_CASES, ids=[c.name for c in ARCHIVE_CASES])
def test_hostile_archives(case: ArchiveCase, tmp_path: Path, the_caps: None) -> None:
    source = case.build(tmp_path)
    outcome, _ = measured(source)
    if case.source_error is None:
        assert outcome.error is None, outcome.error
    else:
        # The whole input stops with one line naming the file (no markers are
        # sent: its portals stay held until a complete re-import).
        assert outcome.error is not None and case.source_error in outcome.error
    assert len(outcome.rejected) == len(case.rejected), outcome.rejected
    for (where, reason), (want_where, want_reason) in zip(
        outcome.rejected, case.rejected, strict=True
    ):
        assert where.startswith(want_where) and want_reason in reason, (where, reason)
        assert reason.strip()
    if case.bodies is not None:
        got = outcome.bodies
        assert len(got) == len(case.bodies), got
        for body, want in zip(got, case.bodies, strict=True):
            if want is not None:  # None: a notice in place of refused media
                assert body.endswith(want), (body, want)
