"""The one dead-letter reporter, against the real broker."""

from __future__ import annotations

from tests.helpers import read_raw
from topics import bus
from topics.codec import decode
from topics.deadletter import EXCERPT_CHARS, DeadLetters, Stage, dead_letter, log_source
from topics.records import DeadLetter
from topics.settings import Settings


def test_excerpt_and_reason_are_bounded() -> None:
    letter = dead_letter(
        Stage.PIPELINE, "x" * 10_000, b"\xff" + b"a" * 100_000, source="f:1", key=b"k"
    )
    assert len(letter.original) < EXCERPT_CHARS + 100
    assert letter.original.startswith("\ufffd")
    assert len(letter.reason) < 2100
    assert letter.key == "k" and letter.stage == "pipeline"


def test_log_source_names_the_real_topic() -> None:
    assert log_source("backflow.history", 3, 17) == "backflow.history[3]@17"


async def test_report_publishes_one_letter_per_rejection(stack: Settings) -> None:
    producer = bus.producer(stack)
    await bus.start(producer, stack)
    try:
        reporter = DeadLetters(
            producer,
            stack.catalog.dead_letters,
            Stage.SINK,
            scrub=lambda s: s.replace("tok", "***"),
        )
        await reporter.report(
            "homeserver refused tok", b'{"a":1}', source=log_source("t", 0, 5), key="wa:p1"
        )
        built = reporter.build("bad", "orig", source="chat.txt:4")
        await reporter.report_all([built])
    finally:
        await producer.stop()
    raw = await read_raw(stack, stack.catalog.dead_letters, expect=2)
    letters = sorted((decode(v) for _, v in raw), key=lambda r: r.reason)
    assert all(isinstance(r, DeadLetter) for r in letters)
    assert [(r.stage, r.reason, r.source, r.key) for r in letters] == [
        ("sink", "bad", "chat.txt:4", None),
        ("sink", "homeserver refused ***", "t[0]@5", "wa:p1"),
    ]
    assert reporter.count == 2
    assert {k for k, _ in raw} == {b"wa:p1", b"sink"}
