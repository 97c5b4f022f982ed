"""Canonical records, one JSON object per line (docs/records.md).

The generic source: what a script, a third-party exporter or another bridge
writes when it has history in hand. Lines are validated by the one codec; a
bad line is rejected with its line number, the field at fault, the bytes read
and, when the line names a usable network and portal, the portal's key.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from connectors.source import LongLine, Rejected, Source, SourceError, SourceItem, read_lines
from topics.codec import MAX_RECORD_BYTES, RecordError, decode
from topics.records import NetworkMessage, PortalInfo
from topics.schema import usable_key

# A line longer than a record may be can never become one: it is rejected
# without being held in memory (a 10 MB line used to crash the import).
MAX_LINE_BYTES = MAX_RECORD_BYTES


class JsonlSource(Source):
    name = "jsonl"
    description = "canonical backflow records, one JSON object per line"
    decoded = True  # every record comes from topics.codec.decode

    def read(self) -> Iterator[SourceItem]:
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        self.track(handle, self.path.stat().st_size)
        with handle:
            for number, raw in read_lines(handle, MAX_LINE_BYTES, heads=True):
                where = f"{self.path.name}:{number}"
                if raw is None or isinstance(raw, LongLine):
                    # The dead letter carries the line's start (bounded), not nothing.
                    reason = f"line over {MAX_LINE_BYTES} bytes: not read"
                    yield Rejected(where, reason, raw or b"", key=key_of(raw or b""))
                    continue
                line = raw.strip()
                if not line:
                    continue
                try:
                    record = decode(line)
                except RecordError as exc:
                    yield Rejected(where, str(exc), raw, key=key_of(line))
                    continue
                if not isinstance(record, NetworkMessage | PortalInfo):
                    yield Rejected(
                        where,
                        f"field 'type': {record.TYPE!r} records are not accepted from sources",
                        raw,
                        key=key_of(line),
                    )
                    continue
                self.at = where
                yield record


def key_of(line: bytes) -> str | None:
    """The portal key a rejected line names, when its network and portal are usable."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return usable_key(obj.get("network"), obj.get("portal")) if isinstance(obj, dict) else None
