"""Canonical records, one JSON object per line (docs/records.md).

The generic source: what a script, a third-party exporter or another bridge
writes when it has history in hand. Lines are validated by the one codec; a
bad line is rejected with its line number and the field at fault.
"""

from __future__ import annotations

from collections.abc import Iterator

from connectors.source import Rejected, Source, SourceError, SourceItem
from topics.codec import RecordError, decode
from topics.records import NetworkMessage, PortalInfo


class JsonlSource(Source):
    name = "jsonl"
    description = "canonical backflow records, one JSON object per line"

    def read(self) -> Iterator[SourceItem]:
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        self.track(handle, self.path.stat().st_size)
        with handle:
            for number, raw in enumerate(handle, start=1):
                line = raw.strip()
                if not line:
                    continue
                where = f"{self.path.name}:{number}"
                try:
                    record = decode(line)
                except RecordError as exc:
                    yield Rejected(where, str(exc), line.decode("utf-8", "replace"))
                    continue
                if not isinstance(record, NetworkMessage | PortalInfo):
                    yield Rejected(
                        where,
                        f"field 'type': {record.TYPE!r} records are not accepted from sources",
                        line.decode("utf-8", "replace"),
                    )
                    continue
                yield record
