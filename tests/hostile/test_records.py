"""The record corpus (tests/hostile/corpus.py) through every entry point that takes records.

JSONL import, live ingest and records produced straight onto the pipeline's
topics. For each bad record: one rejection whose reason names the field (and
the file and line, or the request's index, or the topic offset), one dead
letter, and the valid neighbours around it all arrive, in order. Memory is
measured where an input can be made arbitrarily large.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import orjson
import pytest

from connectors.conformance import messages, run
from connectors.ingest import serve
from connectors.publish import publish_source
from connectors.sources.jsonl import MAX_LINE_BYTES, JsonlSource
from pipeline.intake import prepare
from tests.helpers import free_port, read_topic, traced_peak
from tests.hostile.corpus import (
    CASES,
    REJECTED,
    Case,
    message,
    neighbour_ids,
    with_neighbours,
)
from topics.records import DeadLetter, NetworkMessage
from topics.settings import Settings


def _reason_names(reason: str, case: Case, prefix: str = "") -> None:
    assert case.reason in reason, (case.name, reason)
    if case.field:
        assert f"field '{prefix}{case.field}'" in reason, (case.name, reason)


def write_corpus(path: Path, cases: list[Case], portal: str) -> dict[int, Case]:
    """The cases between valid neighbours, one per line; line number -> case."""
    lines = with_neighbours(cases, portal)
    path.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
    return {n: case for n, (_, case) in enumerate(lines, start=1) if case is not None}


# ---------------------------------------------------------------- JSONL import


def test_jsonl_rejects_each_bad_line_by_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "hostile.jsonl"
    at = write_corpus(path, CASES, "neighbours")
    records, rejected, _ = run(JsonlSource, path)
    by_line = {int(r.where.rsplit(":", 1)[1]): r for r in rejected}
    assert len(by_line) == len(rejected) == len(REJECTED)  # one rejection each
    for line, case in at.items():
        if case.rejected:
            rejection = by_line.pop(line)
            assert rejection.where == f"hostile.jsonl:{line}"
            _reason_names(rejection.reason, case)
            # The bytes read, for the dead letter (of a line over the cap, its start).
            assert rejection.original
        else:
            assert line not in by_line, (case.name, by_line.get(line))
    assert not by_line
    mine = [m.id for m in messages(records) if m.portal == "neighbours"]
    assert mine == neighbour_ids(CASES)  # every neighbour, once, in order


def test_jsonl_truncated_last_line_and_a_50mb_line_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    good = orjson.dumps(message("ok"))
    with path.open("wb") as out:
        out.write(good + b"\n")
        out.write(b'{"type":"message","content":{"body":"' + b"A" * (50 * 1024 * 1024) + b'"}}\n')
        out.write(orjson.dumps(message("after")) + b"\n")
        out.write(good[:40])  # cut off mid-record, no newline
    (records, rejected, _), peak = traced_peak(lambda: run(JsonlSource, path))
    assert [m.id for m in messages(records)] == ["ok", "after"]
    assert [(r.where, r.reason.split(":")[0]) for r in rejected] == [
        ("big.jsonl:2", f"line over {MAX_LINE_BYTES} bytes"),
        ("big.jsonl:4", "invalid JSON"),
    ]
    # The over-long line's dead letter carries its start, bounded (issue 10 item 5).
    head = bytes(rejected[0].original)
    assert head.startswith(b'{"type":"message"') and len(head) == 16 * 1024
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for a 50 MB line"


async def test_jsonl_import_dead_letters_one_per_bad_line_and_publishes_the_rest(
    stack: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "hostile.jsonl"
    at = write_corpus(path, CASES, "neighbours")
    summary = await publish_source(JsonlSource(path), stack)
    assert summary.rejected == len(REJECTED)
    letters = await read_topic(stack, stack.catalog.dead_letters, expect=len(REJECTED))
    assert len(letters) == len(REJECTED)
    by_source = {d.source: d for d in letters if isinstance(d, DeadLetter)}
    for line, case in at.items():
        if case.rejected:
            letter = by_source[f"hostile.jsonl:{line}"]
            assert letter.stage == "import"
            _reason_names(letter.reason, case)
            assert len(letter.original) <= 17 * 1024  # a bounded excerpt
    history = await read_topic(stack, stack.catalog.history)
    mine = [r.id for r in history if isinstance(r, NetworkMessage) and r.portal == "neighbours"]
    assert mine == neighbour_ids(CASES)


# ---------------------------------------------------------------- live ingest


@pytest.fixture
async def ingest(stack: Settings) -> AsyncIterator[tuple[Settings, str]]:
    port = free_port()
    settings = stack.with_overrides(
        {
            "ingest.listen": f"127.0.0.1:{port}",
            "ingest.token": "s3cret",
            "ingest.max_body_bytes": 2 * 1024 * 1024,
        }
    )
    ready = asyncio.Event()
    server = asyncio.create_task(serve(settings, ready))
    await asyncio.wait_for(ready.wait(), 30)
    yield settings, f"http://127.0.0.1:{port}/v1/records"
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)


async def test_ingest_answers_each_bad_record_400_naming_index_and_field(
    ingest: tuple[Settings, str],
) -> None:
    settings, url = ingest
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    sent: list[str] = []
    async with aiohttp.ClientSession(headers=auth) as http:
        for i, case in enumerate(CASES):
            # A valid record first in the same batch: all-or-nothing, so it is
            # published only when the case is valid too.
            good = orjson.dumps(message(f"n{i}", "neighbours", history=True))
            body = b"[" + good + b"," + case.raw + b"]"
            async with http.post(url, data=body) as r:
                answer = await r.json()
                if case.rejected:
                    assert r.status == 400, (case.name, answer)
                    assert case.reason in answer["reason"], (case.name, answer)
                    # The field within the batch; the record or the body as a whole.
                    want = (f"records[1].{case.field}",) if case.field else ("records[1]", "")
                    assert answer["field"] in want, (case.name, answer)
                else:
                    assert r.status == 200 and answer == {"accepted": 2}, (case.name, answer)
                    sent.append(f"n{i}")
            # The neighbour batch after it goes through whatever came before.
            after = orjson.dumps(message(f"a{i}", "neighbours", history=True))
            async with http.post(url, data=after) as r:
                assert r.status == 200, await r.text()
                sent.append(f"a{i}")
    letters = await read_topic(settings, settings.catalog.dead_letters, expect=len(REJECTED))
    assert len(letters) == len(REJECTED)
    assert all(d.stage == "ingest" and d.source.startswith("http:") for d in letters)
    history = await read_topic(settings, settings.catalog.history)
    got = [r.id for r in history if isinstance(r, NetworkMessage) and r.portal == "neighbours"]
    assert got == sent


# ---------------------------------------------------------------- topics (pipeline intake)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_intake_dead_letters_a_bad_value_and_keeps_its_neighbours(case: Case) -> None:
    topic = "t-history"
    values = [orjson.dumps(message("before")), case.raw, orjson.dumps(message("after"))]
    fetched = [
        SimpleNamespace(topic=topic, partition=1, offset=40 + i, key=b"hostile:p", value=v)
        for i, v in enumerate(values)
    ]
    prepared = prepare(fetched, {topic: "history"})
    ids = [getattr(i.record, "id", None) for i in prepared.items]
    if case.rejected:
        assert ids == ["before", "after"]
        (letter,) = prepared.letters
        assert letter.source == "t-history[1]@41" and letter.key == "hostile:p"
        _reason_names(letter.reason, case)
    else:
        assert not prepared.letters, prepared.letters
        assert len(ids) == 3


def test_intake_memory_is_bounded_by_the_batch_not_by_what_is_refused() -> None:
    """A batch of the biggest bad values costs about what holding them costs."""
    worst = [c for c in REJECTED if len(c.raw) > 50_000]
    fetched = [
        SimpleNamespace(topic="t", partition=0, offset=i, key=b"k", value=c.raw)
        for i, c in enumerate(worst * 10)
    ]
    held = sum(len(f.value) for f in fetched)
    prepared, peak = traced_peak(lambda: prepare(fetched, {"t": "history"}))
    assert len(prepared.letters) == len(fetched)
    # Each dead letter keeps a bounded excerpt, not the value.
    assert peak < 2 * 1024 * 1024 + held // 10, f"peak {peak / 1e6:.1f} MB for {held / 1e6:.1f} MB"
