"""The hostile corpus through each importer (1/2): hostile strings in every field read.

A NUL, terminal controls and a bidi override in each field WhatsApp, Slack,
Telegram and CSV read, in the middle one of three messages: either one
rejection naming the file and line or entry and the field, or carried as a
documented rule (docs/reliability.md); both neighbours import either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from connectors.source import Source
from connectors.sources.example_csv import CsvSource
from connectors.sources.slack import SlackSource
from connectors.sources.telegram import TelegramSource
from connectors.sources.whatsapp import WhatsAppSource
from tests.hostile.corpus import NASTY
from tests.hostile.exports import (
    CSV_HEAD,
    TG_WHERE,
    measured,
    slack_day,
    slack_zip,
    telegram_export,
    telegram_message,
    whatsapp_lines,
)

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


# ---------------------------------------------------------------- surrogates

# Written by json.dumps (ensure_ascii), as Slack writes every non-ASCII
# character: "\ud800" escapes in the file. A lone one is no text.
LONE = {
    "high": "a\ud800b",
    "low": "a\udc00b",
    "high-at-end": "ab\ud83d",
    "two-highs": "\ud83d\ud83d\ude00",
}
CARRIED = {
    "pair": "a\U0001f600b",  # "\ud83d\ude00" in the file
    "escaped-backslash": "\\ud800",  # "\\ud800" in the file: text, not an escape
}


def _surrogate_source(importer: str, tmp: Path, value: str) -> Source:
    if importer == "slack":
        return _slack("text")(tmp, value)
    return _telegram("text")(tmp, value)


@pytest.mark.parametrize("importer", ["slack", "telegram"])
@pytest.mark.parametrize("label", sorted(LONE))
def test_lone_surrogate_refuses_the_message(importer: str, label: str, tmp_path: Path) -> None:
    outcome, _ = measured(_surrogate_source(importer, tmp_path, LONE[label]))
    where = "c/2024-01-03.json[1]" if importer == "slack" else TG_WHERE
    assert [r[0] for r in outcome.rejected] == [where], outcome.rejected
    assert "lone UTF-16 surrogate" in outcome.rejected[0][1]
    assert [b[-3:] for b in outcome.bodies] == [("one", "t1")[importer == "telegram"][-3:]] + [
        ("three", "t3")[importer == "telegram"][-3:]
    ]


@pytest.mark.parametrize("importer", ["slack", "telegram"])
@pytest.mark.parametrize("label", sorted(CARRIED))
def test_surrogate_pairs_and_escaped_backslashes_are_text(
    importer: str, label: str, tmp_path: Path
) -> None:
    outcome, _ = measured(_surrogate_source(importer, tmp_path, CARRIED[label]))
    assert not outcome.rejected, outcome.rejected
    assert len(outcome.bodies) == 3
    assert CARRIED[label] in outcome.bodies[1]
