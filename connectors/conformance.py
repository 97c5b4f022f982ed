"""Conformance kit for source connectors: plain functions, usable from any test runner.

A connector that passes these checks can be published by the framework without
surprises: its records survive the codec, its ids do not change between runs
(so re-imports deduplicate), its timestamps are milliseconds, every portal it
mentions is described, and it streams instead of loading its input.

Typical use from pytest::

    from connectors.conformance import check_source

    def test_my_connector(tmp_path):
        check_source(lambda: MySource(sample_path), expected_kinds={"text", "media"})

Each helper raises ``AssertionError`` with a message naming the offending
record, so failures read well under pytest and in plain scripts alike.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from connectors.source import Rejected, Source, SourceItem
from topics.codec import RecordError, decode, encode
from topics.records import MIN_TS, NetworkMessage, PortalInfo

Record = NetworkMessage | PortalInfo
MakeSource = Callable[[], Source]

# A clock skew we tolerate for "not in the future" (phones are often a bit off).
DEFAULT_SKEW_MS = 24 * 3600 * 1000


@dataclass
class Report:
    """What ``check_source`` saw, for extra assertions by the caller."""

    records: list[Record]
    rejected: list[Rejected]
    stats: dict[str, int]


def collect(source: Source) -> tuple[list[Record], list[Rejected]]:
    """Run a source to the end: (records, rejected items)."""
    records: list[Record] = []
    rejected: list[Rejected] = []
    for item in source.read():
        if isinstance(item, Rejected):
            rejected.append(item)
        elif isinstance(item, NetworkMessage | PortalInfo):
            records.append(item)
        else:
            raise AssertionError(f"{type(source).__name__} yielded {type(item).__name__}: {item!r}")
    return records, rejected


def run(
    make: Callable[[Path, dict[str, str]], Source], path: Path, **options: str
) -> tuple[list[Record], list[Rejected], Source]:
    """Build a source for ``path`` with ``options`` and collect it: (records, rejected, source).

    The source comes back too, for its ``stats`` after the run.
    """
    source = make(Path(path), options)
    records, rejected = collect(source)
    return records, rejected, source


def messages(records: Iterable[SourceItem]) -> list[NetworkMessage]:
    """The messages among collected records, in order."""
    return [r for r in records if isinstance(r, NetworkMessage)]


def by_id(records: Iterable[SourceItem]) -> dict[tuple[str, int], NetworkMessage]:
    """The messages among collected records by (message id, part)."""
    return {(m.id, m.part): m for m in messages(records)}


def _describe(record: Record) -> str:
    if isinstance(record, NetworkMessage):
        return f"message {record.portal}/{record.id} part {record.part}"
    return f"portal {record.portal}"


def assert_valid_records(records: Iterable[SourceItem]) -> None:
    """Every record round-trips through the one codec unchanged.

    Catches fields the schema does not carry for a kind (e.g. ``html`` on
    media), wrong types, over-long text and out-of-range timestamps.
    """
    for record in records:
        if isinstance(record, Rejected):
            continue
        try:
            back = decode(encode(record))
        except RecordError as exc:
            raise AssertionError(f"{_describe(record)} is invalid: {exc}") from None
        if back != record:
            raise AssertionError(
                f"{_describe(record)} does not survive encode/decode:\n  {record!r}\n  {back!r}"
            )


def message_keys(records: Iterable[SourceItem]) -> list[tuple[str, str, int]]:
    """The identity of each message as the pipeline sees it: (portal, id, part)."""
    return [(m.portal, m.id, m.part) for m in messages(records)]


def assert_unique_ids(records: Iterable[SourceItem]) -> None:
    """No two messages share (portal, id, part): the pipeline would drop one."""
    seen: set[tuple[str, str, int]] = set()
    for key in message_keys(records):
        if key in seen:
            raise AssertionError(f"duplicate message id {key}")
        seen.add(key)


def assert_ids_stable(make_source: MakeSource) -> list[Record]:
    """Two reads of the same input give the same message ids in the same order."""
    first, _ = collect(make_source())
    second, _ = collect(make_source())
    a, b = message_keys(first), message_keys(second)
    if a != b:
        diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        at = (
            f"first difference at message {diff}: {a[diff]} vs {b[diff]}"
            if diff is not None
            else ""
        )
        raise AssertionError(f"ids differ between two reads ({len(a)} vs {len(b)} messages) {at}")
    return first


def assert_timestamps_sane(
    records: Iterable[SourceItem], skew_ms: int = DEFAULT_SKEW_MS, now_ms: int | None = None
) -> None:
    """Timestamps are integer Unix ms, not before 2000 and not in the future (beyond skew)."""
    limit = (now_ms if now_ms is not None else int(time.time() * 1000)) + skew_ms
    for m in messages(records):
        if isinstance(m.ts, bool) or not isinstance(m.ts, int):
            raise AssertionError(f"{_describe(m)}: ts {m.ts!r} is not an integer")
        if m.ts < MIN_TS:
            raise AssertionError(f"{_describe(m)}: ts {m.ts} is before 2000 (seconds, not ms?)")
        if m.ts > limit:
            raise AssertionError(f"{_describe(m)}: ts {m.ts} is in the future (microseconds?)")


def assert_portal_metadata(records: Iterable[SourceItem]) -> None:
    """Every portal a message uses has a PortalInfo with a name, yielded before the message."""
    named: set[tuple[str, str]] = set()
    described: set[tuple[str, str]] = set()
    for r in records:
        if isinstance(r, PortalInfo):
            described.add((r.network, r.portal))
            if r.name:
                named.add((r.network, r.portal))
        elif isinstance(r, NetworkMessage):
            if (r.network, r.portal) not in described:
                raise AssertionError(f"{_describe(r)} comes before any PortalInfo for its portal")
    missing = described - named
    if missing:
        raise AssertionError(f"portals without a name: {sorted(missing)}")


def assert_content_kinds(records: Iterable[SourceItem], expected_kinds: Iterable[str]) -> None:
    """At least the given content kinds occur (a parser that lost a kind fails here)."""
    found = {m.content.kind for m in messages(records)}
    missing = set(expected_kinds) - found
    if missing:
        raise AssertionError(f"content kinds not produced: {sorted(missing)} (got {sorted(found)})")


def assert_dependents_follow_targets(records: Iterable[SourceItem]) -> None:
    """Reactions, edits and redactions whose target is in the input come after it."""
    seen: set[tuple[str, str]] = set()
    pending: dict[tuple[str, str], str] = {}
    for m in messages(records):
        seen.add((m.portal, m.id))
        target = m.content.target
        if target and (m.portal, target) not in seen:
            pending[(m.portal, target)] = _describe(m)
    late = [who for key, who in pending.items() if key in seen]
    if late:
        raise AssertionError(f"yielded before their target: {late[:5]}")


def _peak_while_reading(make: Callable[[int], Source], n: int) -> tuple[int, int]:
    """Peak traced memory (bytes) while draining a source of size n, and its item count."""
    source = make(n)  # generating the input is not the connector's cost
    count = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in source.read():
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, count


def assert_streaming_memory(
    make_source_for_size: Callable[[int], Source],
    small_n: int,
    large_n: int,
    factor: float = 1.5,
    slack_bytes: int = 1 << 20,
) -> tuple[int, int]:
    """Reading a large input needs about as much memory as a small one.

    ``make_source_for_size(n)`` builds an input of n messages and returns a
    source over it. Peaks are measured with tracemalloc while draining
    ``read()`` (items are dropped as they come, like the publisher does); the
    large peak must stay under ``factor * small + slack_bytes``. Returns both
    peaks for reporting.
    """
    small, small_count = _peak_while_reading(make_source_for_size, small_n)
    large, large_count = _peak_while_reading(make_source_for_size, large_n)
    if large_count <= small_count:
        raise AssertionError(f"large input gave {large_count} items, small {small_count}")
    if large > factor * small + slack_bytes:
        raise AssertionError(
            f"memory grows with input: peak {small / 1024:.0f} KiB for {small_n} messages, "
            f"{large / 1024:.0f} KiB for {large_n} (limit {factor}x + {slack_bytes // 1024} KiB)"
        )
    return small, large


def check_source(
    make_source: MakeSource,
    expected_kinds: Iterable[str] = (),
    allow_rejected: bool = True,
    skew_ms: int = DEFAULT_SKEW_MS,
) -> Report:
    """Run every record-level check on one input; return what was read."""
    records = assert_ids_stable(make_source)
    source = make_source()
    records, rejected = collect(source)
    if not allow_rejected and rejected:
        raise AssertionError(f"unexpected rejects: {rejected[:3]}")
    if not messages(records):
        raise AssertionError("the source yielded no messages")
    assert_valid_records(records)
    assert_unique_ids(records)
    assert_timestamps_sane(records, skew_ms=skew_ms)
    assert_portal_metadata(records)
    assert_dependents_follow_targets(records)
    assert_content_kinds(records, expected_kinds)
    for r in records:
        if r.network != source.network and source.network:
            raise AssertionError(
                f"{_describe(r)} has network {r.network!r}, not {source.network!r}"
            )
    return Report(records=records, rejected=rejected, stats=dict(source.stats))
