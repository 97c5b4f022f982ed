"""``backflow import --dry-run``: read and validate an export, publish nothing.

A person looks before anything is written: per portal the name, what it
holds (messages, reactions, edits, media) and from how many senders, its first
and last date, and every rejection with its file and line. The records are
checked exactly as the publisher checks them (``check_record``), so what the
dry run accepts is what an import publishes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from connectors.publish import check_record, describe_kinds
from connectors.source import Rejected, Source
from topics.codec import RecordError
from topics.records import NetworkMessage, PortalInfo

# Senders remembered per portal for the count; beyond it the count is a floor.
_MAX_SENDERS = 10_000


@dataclass
class PortalPreview:
    """What one portal would receive."""

    name: str | None = None
    kinds: Counter[str] = field(default_factory=Counter)
    senders: set[str] = field(default_factory=set)
    first: int | None = None
    last: int | None = None

    def add(self, message: NetworkMessage) -> None:
        self.kinds[message.content.kind] += 1
        if len(self.senders) < _MAX_SENDERS:
            self.senders.add(message.sender.id)
        self.first = message.ts if self.first is None else min(self.first, message.ts)
        self.last = message.ts if self.last is None else max(self.last, message.ts)


@dataclass
class Preview:
    portals: dict[str, PortalPreview] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rejected_total: int = 0

    def lines(self, stats: dict[str, int], warnings: list[str]) -> list[str]:
        out = [f"dry run: nothing published; {len(self.portals)} portals"]
        for key, p in self.portals.items():
            span = f"{_day(p.first)} .. {_day(p.last)}" if p.first is not None else "no messages"
            out.append(
                f"  {key} {p.name or ''!s}: {describe_kinds(p.kinds)} from "
                f"{len(p.senders)} senders, {span}"
            )
        out += [f"  {name}: {count}" for name, count in sorted(stats.items())]
        out += [f"warning: {w}" for w in warnings]
        out.append(f"{self.rejected_total} rejected")
        out += [f"  rejected {where}: {reason}" for where, reason in self.rejected]
        if self.rejected_total > len(self.rejected):
            out.append(f"  … and {self.rejected_total - len(self.rejected)} more")
        return out


def _day(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000, UTC).strftime("%Y-%m-%d")


def preview(
    source: Source,
    keep_rejections: int = 200,
    progress: Callable[[int], None] | None = None,
) -> Preview:
    """Read ``source`` to the end, validate every record, and summarize; memory per portal."""
    result = Preview()
    for n, item in enumerate(source.read(), start=1):
        if isinstance(item, Rejected):
            _rejected(result, item.where, item.reason, keep_rejections)
            continue
        try:
            record, _ = check_record(item, source.decoded)
        except RecordError as exc:
            where = source.at if isinstance(item, NetworkMessage) else None
            _rejected(result, where or f"{source.path.name} item {n}", str(exc), keep_rejections)
            continue
        portal = result.portals.setdefault(record.key, PortalPreview())
        if isinstance(record, PortalInfo):
            portal.name = record.name or portal.name
        else:
            portal.add(record)
        if progress is not None and n % 1000 == 0:
            progress(n)
    return result


def _rejected(result: Preview, where: str, reason: str, keep: int) -> None:
    result.rejected_total += 1
    if len(result.rejected) < keep:
        result.rejected.append((where, reason))
