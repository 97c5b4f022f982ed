"""The source framework bounds records: oversize messages are refused, huge portals trimmed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from connectors.publish import publish_source
from connectors.source import Source, SourceItem
from tests.helpers import read_topic
from topics.codec import MAX_RECORD_BYTES, encode
from topics.records import (
    Content,
    HistoryComplete,
    Member,
    NetworkMessage,
    PortalInfo,
    Sender,
)

TS = 1_700_000_000_000


class BigSource(Source):
    """A real connector (in the test) whose input is bigger than a Kafka record."""

    name = "big"
    network = "big"

    def read(self) -> Iterator[SourceItem]:
        members = tuple(Member(id=f"U{i:07d}", name=f"Member number {i}") for i in range(30_000))
        yield PortalInfo("big", "crowd", name="Crowd", members=members)
        yield self.message("m1", Content(kind="text", body="before"))
        blob = "A" * (MAX_RECORD_BYTES - 10)  # fits the field, not the record with the rest
        yield self.message(
            "m2", Content(kind="media", media_type="file", data=blob, filename="f", body="f")
        )
        yield self.message("m3", Content(kind="text", body="after"))

    def message(self, mid: str, content: Content) -> NetworkMessage:
        ts = TS + int(mid[1:])
        return NetworkMessage("big", "crowd", mid, Sender("U0000001"), ts, content)


async def test_oversize_records_are_refused_or_trimmed_and_the_run_completes(stack) -> None:
    summary = await publish_source(BigSource(Path(".")), stack)
    assert (summary.messages, summary.rejected) == (2, 1)
    assert summary.stats["members_capped"] > 0
    history = await read_topic(stack, stack.catalog.history, expect=4)
    portal = next(r for r in history if isinstance(r, PortalInfo))
    assert 0 < len(portal.members) < 30_000
    assert len(portal.members) + summary.stats["members_capped"] == 30_000
    assert len(encode(portal)) <= MAX_RECORD_BYTES
    assert [r.id for r in history if isinstance(r, NetworkMessage)] == ["m1", "m3"]
    (done,) = [r for r in history if isinstance(r, HistoryComplete)]
    assert done.count == 2  # the marker is sent: the portal is not held forever
    (letter,) = await read_topic(stack, stack.catalog.dead_letters, expect=1)
    assert "over the 900000-byte limit" in letter.reason
    assert letter.key == "big:crowd" and len(letter.original) < 20_000  # a bounded excerpt
