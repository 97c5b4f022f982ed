"""A complete, small source connector: chat history from a CSV file.

This is the example of docs/connectors.md. The file has a header row with the
columns ``portal,id,sender,ts,body``: ``ts`` is Unix milliseconds or an ISO
8601 time with a UTC offset (``2024-01-31T09:30:00+01:00``). Rows are read one
at a time; a bad row is rejected with its line number and the import goes on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import datetime

from connectors.source import BoundedLines, Rejected, Source, SourceError, SourceItem
from topics.records import Content, NetworkMessage, PortalInfo, Sender

COLUMNS = ("portal", "id", "sender", "ts", "body")
MAX_LINE_CHARS = 256 * 1024  # memory stays bounded whatever one line holds


def parse_ts(value: str) -> int:
    """Unix milliseconds, or ISO 8601 with an offset, to Unix milliseconds."""
    value = value.strip()
    if value.isdigit():
        return int(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        # A time without an offset is ambiguous; refuse it rather than guess.
        raise ValueError(f"time {value!r} has no UTC offset")
    return int(moment.timestamp() * 1000)


class CsvSource(Source):
    name = "csv"
    network = "csv"
    description = "example: one message per CSV row (portal,id,sender,ts,body)"

    def read(self) -> Iterator[SourceItem]:
        # Option network=… lets one CSV importer serve any network name.
        network = self.options.get("network", self.network)
        try:
            handle = self.path.open(newline="", encoding="utf-8", errors="replace")
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        with handle:
            lines = BoundedLines(handle, MAX_LINE_CHARS)
            rows = csv.DictReader(lines)
            missing = [c for c in COLUMNS if c not in (rows.fieldnames or ())]
            if missing:
                raise SourceError(f"{self.path.name}: missing columns: {', '.join(missing)}")
            seen: set[str] = set()  # portals announced so far (grows per portal, not per row)
            while True:
                error = row = None
                try:
                    row = next(rows)
                except StopIteration:
                    pass
                except csv.Error as exc:  # a field over csv.field_size_limit(), a bad quote
                    error = exc  # the reader stays usable: the next row follows
                while lines.skipped:
                    where = f"{self.path.name}:{lines.skipped.pop(0)}"
                    yield Rejected(where, f"line over {MAX_LINE_CHARS} characters: not read")
                if error is not None:
                    line = rows.reader.line_num  # DictReader.line_num lags on errors
                    yield Rejected(f"{self.path.name}:{line}", f"unreadable row: {error}")
                    continue
                if row is None:
                    break
                where = f"{self.path.name}:{rows.line_num}"
                try:
                    ts = parse_ts(row["ts"] or "")
                except ValueError as exc:
                    yield Rejected(where, f"field 'ts': {exc}", ",".join(map(str, row.values())))
                    continue
                portal = row["portal"]
                if portal not in seen:
                    seen.add(portal)
                    yield PortalInfo(network=network, portal=portal, name=portal)
                self.at = where  # a row the framework refuses is named by its line
                yield NetworkMessage(
                    network=network,
                    portal=portal,
                    id=row["id"],
                    sender=Sender(id=row["sender"], name=row["sender"]),
                    ts=ts,
                    content=Content(kind="text", body=row["body"]),
                )
