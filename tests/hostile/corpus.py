"""The hostile record corpus, generated in code: one bad record per case.

Each ``Case`` is the bytes of one record (a JSONL line, an ingest body, a
Kafka value) with what every entry point must say about it: the field the
reason names and a fragment of the reason, or ``field=None`` when the record
is valid and handled by a documented rule (docs/reliability.md: display
names and bodies are carried as they are, escaped when printed).

Every string field of a message and of a portal record gets a NUL, terminal
control sequences and a bidi override; then lone surrogates, invalid UTF-8,
wrong types, missing fields, absurd timestamps, oversize and deep values,
truncated records and values that are not objects at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import orjson

BASE_TS = 1_700_000_000_000
NETWORK = "hostile"

NASTY = {
    "nul": "x\x00y",
    "controls": "\x1b]0;owned\x07\x1b[2J\r\x7f\x9b1m",  # OSC title, clear screen, C1 CSI
    "bidi": "\u202egnp.exe",
}

# Dotted paths of the string fields, and what the codec makes of each.
MESSAGE_STRINGS = (
    "network",
    "portal",
    "id",
    "sender.id",
    "sender.name",
    "sender.avatar_url",
    "content.body",
    "content.html",
    "reply_to",
    "thread",
)
PORTAL_STRINGS = ("name", "topic", "avatar_url", "members.0.id", "members.0.name")
IDS = {"portal", "id", "sender.id", "reply_to", "thread", "members.0.id"}
NAMES = {"sender.name", "name", "members.0.name"}  # display names: no U+0000 either
URLS = {"sender.avatar_url", "avatar_url"}
REQUIRED = ("network", "portal", "id", "sender", "sender.id", "ts", "content", "content.body")


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    field: str | None  # the field the reason names ("" for a whole-record defect)
    reason: str = ""  # a fragment of the reason

    @property
    def rejected(self) -> bool:
        return self.field is not None


def message(mid: str, portal: str = "p", **over: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": "message",
        "network": NETWORK,
        "portal": portal,
        "id": mid,
        "sender": {"id": "alice", "name": "Alice"},
        "ts": BASE_TS,
        "content": {"kind": "text", "body": f"body of {mid}"},
    }
    record.update(over)
    return record


def portal_record(portal: str = "p") -> dict[str, Any]:
    return {
        "type": "portal",
        "network": NETWORK,
        "portal": portal,
        "name": "Room",
        "members": [{"id": "alice", "name": "Alice"}],
    }


def _set(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(record)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()


def _string_expectation(path: str, label: str) -> tuple[str | None, str]:
    """What the codec says about a nasty string in the field at ``path``."""
    last = path.replace(".0.", "[0].")
    if path == "network":
        return "network", "U+0000" if label == "nul" else "must be lowercase"
    if path in URLS:
        return (None, "") if label == "bidi" else (last, "must be an http(s)://")
    if path in IDS | NAMES and label == "nul":
        return last, "U+0000"
    return None, ""  # names, bodies, topics: carried as they are (escaped when printed)


def _string_cases(kind: str, base: dict[str, Any], paths: tuple[str, ...]) -> list[Case]:
    cases = []
    marker = "MARKER"
    for path in paths:
        url = path in URLS
        for label, nasty in NASTY.items():
            value = f"https://media.example/{nasty}" if url else nasty
            field, reason = _string_expectation(path, label)
            raw = orjson.dumps(_set(base, path, value))
            cases.append(Case(f"{kind}.{path}={label}", raw, field, reason))
        # A lone surrogate escape is valid JSON text but no Unicode string;
        # raw bytes that are not UTF-8 are not JSON text at all.
        template = orjson.dumps(_set(base, path, f"https://m.example/{marker}" if url else marker))
        for label, bad, reason in (
            ("lone-surrogate", b"\\ud800", "invalid JSON"),
            ("invalid-utf8", b"\xff\xfe", "not valid UTF-8"),
        ):
            raw = template.replace(marker.encode(), bad)
            cases.append(Case(f"{kind}.{path}={label}", raw, "", reason))
    return cases


def record_cases() -> list[Case]:
    """The whole record corpus, in a stable order (pytest ids are the names)."""
    base = message("m")
    cases = _string_cases("message", base, MESSAGE_STRINGS)
    cases += _string_cases("portal", portal_record(), PORTAL_STRINGS)
    for path in ("portal", "id", "sender.name", "content.body", "ts"):
        for label, value in (("int", 12), ("array", ["x"]), ("object", {"a": 1}), ("bool", True)):
            if path == "ts" and label == "int":
                continue
            expected = "expected an integer" if path == "ts" else "expected a string"
            raw = orjson.dumps(_set(base, path, value))
            cases.append(Case(f"message.{path}={label}", raw, path, expected))
    cases.append(Case("message.ts=string", orjson.dumps(_set(base, "ts", str(BASE_TS))), "ts"))
    cases.append(Case("message.part=-1", orjson.dumps(_set(base, "part", -1)), "part", ">= 0"))
    over = orjson.dumps(_set(base, "part", 2**31))  # Postgres integer columns hold parts
    cases.append(Case("message.part=int4-overflow", over, "part", "at most 2147483647"))
    cases.append(
        Case("message.history=string", orjson.dumps(_set(base, "history", "yes")), "history")
    )
    for path in REQUIRED:
        raw = orjson.dumps(_set(base, path, _DELETE))
        cases.append(Case(f"message.{path}=missing", raw, path, "missing"))
    for label, ts in (
        ("zero", 0),
        ("negative", -1),
        ("year-3000", 32_503_680_000_000),
        ("seconds", 1_700_000_000),
        ("microseconds", 1_700_000_000_000_000),
    ):
        raw = orjson.dumps(_set(base, "ts", ts))
        cases.append(Case(f"message.ts={label}", raw, "ts", "between 2000 and 2100"))
    raw = orjson.dumps(_set(base, "ts", 1e300))
    cases.append(Case("message.ts=float", raw, "ts", "expected an integer"))
    huge = raw.replace(b"1e300", b"9" * 40)  # orjson reads it as a float
    cases.append(Case("message.ts=huge-int", huge, "ts", "expected an integer"))
    long_body = _set(base, "content.body", "x" * 70_000)
    cases.append(Case("message.body=70k", orjson.dumps(long_body), "content.body", "longer than"))
    blob = {"kind": "media", "media_type": "file", "data": "A" * 899_990, "filename": "f"}
    big = orjson.dumps(_set(base, "content", blob))
    cases.append(Case("message.record=over-limit", big, "", "900000"))
    cases.append(Case("deep-array", b"[" * 50_000 + b"]" * 50_000, "", "invalid JSON"))
    deep = orjson.dumps(base)[:-1] + b',"x":' + b'{"a":' * 2000 + b"1" + b"}" * 2001
    cases.append(Case("deep-object", deep, "", "invalid JSON"))
    full = orjson.dumps(base)
    cases.append(Case("truncated", full[: len(full) // 2], "", "invalid JSON"))
    cases.append(Case("nan", full.replace(str(BASE_TS).encode(), b"NaN"), "", "invalid JSON"))
    for label, raw in (("array", b"[]"), ("string", b'"m"'), ("null", b"null"), ("number", b"7")):
        cases.append(Case(f"not-an-object={label}", raw, "", "expected a JSON object"))
    cases.append(Case("type=unknown", orjson.dumps({**base, "type": "exploit"}), "type"))
    cases.append(
        Case(
            "url=file",
            orjson.dumps(_set(base, "sender.avatar_url", "file:///etc/passwd")),
            "sender.avatar_url",
            "http(s)://",
        )
    )
    kind = _set(base, "content.kind", "script")
    cases.append(Case("content.kind=unknown", orjson.dumps(kind), "content.kind", "unknown kind"))
    lat = {"kind": "location", "lat": "north", "lon": 1.0}
    cases.append(
        Case("location.lat=string", orjson.dumps(_set(base, "content", lat)), "content.lat")
    )
    return cases


CASES = record_cases()
REJECTED = [c for c in CASES if c.rejected]
ACCEPTED = [c for c in CASES if not c.rejected]


def with_neighbours(cases: list[Case], portal: str) -> list[tuple[bytes, Case | None]]:
    """Each case between valid messages of ``portal``; (raw, case or None for a neighbour).

    The neighbours are numbered n0, n1, ... in order, so a reader can check
    that every one arrived, once, in order.
    """
    out: list[tuple[bytes, Case | None]] = [(orjson.dumps(portal_record(portal)), None)]
    for i, case in enumerate(cases):
        out.append((orjson.dumps(message(f"n{i}", portal, ts=BASE_TS + i)), None))
        out.append((case.raw, case))
    out.append((orjson.dumps(message(f"n{len(cases)}", portal, ts=BASE_TS + len(cases))), None))
    return out


def neighbour_ids(cases: list[Case]) -> list[str]:
    return [f"n{i}" for i in range(len(cases) + 1)]
