"""Shared by the importer corpus tests: read a source as the publisher does, and export builders.

``validated`` runs a source and checks each record with ``check_record``
(what ``publish_source`` does), so what is accepted is what an import
publishes; ``measured`` adds the traced peak memory and the leak check.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from connectors.publish import check_record
from connectors.source import Rejected, Source, SourceError
from tests.helpers import traced_peak
from topics.codec import RecordError
from topics.records import NetworkMessage

SECRET = "BACKFLOW_HOSTILE_SECRET"
# Caps lowered for speed (fixture the_caps, test_importer_archives.py); bombs
# expand beyond the peak allowed.
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


TG_WHERE = "result.json:chat 42 message 2"
