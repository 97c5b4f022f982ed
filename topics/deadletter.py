"""The one dead-letter reporter: what any stage rejects, with why and where from.

Modelled on Kafka Connect's dead-letter queue: a record a stage cannot handle
does not stop the stage; it goes to the ``dead-letters`` topic with a reason,
the stage that refused it, where it came from (``topic[partition]@offset`` for
a record read from the log, ``file:line`` for an import, ``http:<peer>`` for
live ingest), the portal key when known, and a bounded excerpt of the
original. Every stage reports through :class:`DeadLetters`, so the shape, the
key and the log line are the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from topics.codec import encode
from topics.logs import fields
from topics.records import DeadLetter

# What a dead letter keeps of the original and of the reason: a poison record
# can be as big as the broker allows, and an error text can quote it whole.
EXCERPT_CHARS = 16 * 1024
REASON_CHARS = 2000

log = logging.getLogger("backflow.deadletter")


class Stage(StrEnum):
    """The stage that refused a record (the ``stage`` field of a dead letter)."""

    IMPORT = "import"  # an importer read it from a file
    INGEST = "ingest"  # the live ingest endpoint received it
    PIPELINE = "pipeline"  # the portal pipeline read it from history/live/portal-events
    SINK = "sink"  # a sink read it from matrix-commands


def log_source(topic: str, partition: int, offset: int) -> str:
    """Where a record read from Kafka came from: the real topic name, never a label."""
    return f"{topic}[{partition}]@{offset}"


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def dead_letter(
    stage: Stage,
    reason: str,
    original: bytes | str,
    *,
    source: str | None,
    key: str | bytes | None = None,
) -> DeadLetter:
    """Build a dead letter (reason and original bounded, key decoded)."""
    if isinstance(original, bytes):
        original = original.decode("utf-8", "replace")
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    return DeadLetter(
        stage=str(stage),
        reason=_bounded(reason, REASON_CHARS),
        original=_bounded(original, EXCERPT_CHARS),
        source=source,
        key=key,
        ts=int(time.time() * 1000),
    )


class DeadLetters:
    """Publishes one stage's dead letters to the catalog's topic and logs each once.

    ``report`` waits for the broker's ack (a dead letter must not be lost
    either); ``queue`` returns the delivery future, for callers that wait for
    a window of records at once (importers). ``scrub`` removes secrets (an
    access token in a URL) from reasons before they leave the process.
    """

    def __init__(
        self,
        producer: Any,
        topic: str,
        stage: Stage,
        *,
        scrub: Callable[[str], str] | None = None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.stage = stage
        self.scrub = scrub
        self.count = 0

    def build(
        self,
        reason: str,
        original: bytes | str,
        *,
        source: str | None,
        key: str | bytes | None = None,
    ) -> DeadLetter:
        if self.scrub is not None:
            reason = self.scrub(reason)
        return dead_letter(self.stage, reason, original, source=source, key=key)

    async def queue(self, letter: DeadLetter, message_id: str | None = None) -> asyncio.Future:
        """Hand a dead letter to the producer; the future resolves on the broker's ack.

        ``message_id``: the refused message's, for the log line's fields.
        """
        future = await self.producer.send(
            self.topic, encode(letter), key=(letter.key or str(self.stage)).encode()
        )
        self.count += 1
        where = fields(letter.key or None, message_id)
        log.warning(
            "dead letter (%s, %s): %s", letter.stage, letter.source, letter.reason, extra=where
        )
        return future

    async def report(
        self,
        reason: str,
        original: bytes | str,
        *,
        source: str | None,
        key: str | bytes | None = None,
        message_id: str | None = None,
    ) -> DeadLetter:
        """Build, publish and wait for one dead letter."""
        letter = self.build(reason, original, source=source, key=key)
        await (await self.queue(letter, message_id))
        return letter

    async def report_all(self, letters: list[DeadLetter]) -> None:
        """Publish dead letters built beforehand (``build``) and wait for all acks."""
        futures = [await self.queue(letter) for letter in letters]
        if futures:
            await asyncio.gather(*futures)
