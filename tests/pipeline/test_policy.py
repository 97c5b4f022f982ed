"""Pure pipeline decisions (no services): order, caps, dependents, catch-up, ranking."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pipeline import policy
from pipeline.app import _resume
from pipeline.batch import Incoming
from pipeline.policy import Held, live_decision, plan_release, rank_portals
from pipeline.state import send_command, stored_record
from tests.pipeline_support import msg
from topics.codec import MAX_RECORD_BYTES, decode, encode
from topics.records import Content, SendMessage


def h(mid: str, ts: int, ord: int = 0, **kw: object) -> Held:
    return Held(id=mid, part=int(kw.pop("part", 0)), ts=ts, ord=ord, **kw)  # type: ignore[arg-type]


def ids(plan: policy.Plan) -> list[str]:
    return [m.id for m in plan.release]


def test_order_by_ts_then_original_order_history_before_live() -> None:
    held = [h("c", 2, 5), h("a", 1, 9), h("b", 1, 3), h("l", 1, 1, live=True), h("d", 3, 0)]
    assert ids(plan_release(held)) == ["b", "a", "l", "c", "d"]


def test_cap_keeps_newest_and_ignores_live_and_dependents() -> None:
    held = [h(f"m{i}", i, i) for i in range(10)]
    held += [h("live", 0, 99, live=True), h("r", 20, 100, kind="reaction", target="m9")]
    plan = plan_release(held, cap=3)
    assert ids(plan) == ["live", "m7", "m8", "m9", "r"]
    assert plan.reasons() == {policy.CAP: 7}
    assert ids(plan_release(held, cap=0)) == ["live"]
    assert len(plan_release(held, cap=-1).release) == 12


def test_cap_counts_a_multipart_message_once() -> None:
    held = [h("a", 1, 0), h("b", 2, 1), h("b", 2, 2, part=1)]
    plan = plan_release(held, cap=1)
    assert [(m.id, m.part) for m in plan.release] == [("b", 0), ("b", 1)]


def test_dependents_wait_for_their_target() -> None:
    held = [
        h("r1", 1, 0, kind="reaction", target="t"),  # before its target in ts and input
        h("e1", 2, 1, kind="edit", target="t"),
        h("t", 5, 2),
        h("x", 6, 3, kind="redaction", target="r1"),  # redaction of the reaction
    ]
    assert ids(plan_release(held)) == ["t", "r1", "e1", "x"]


def test_dependents_of_cut_or_missing_targets_are_dropped_with_reasons() -> None:
    held = [h("old", 1, 0), h("new", 2, 1)]
    held += [h("r_old", 3, 2, kind="reaction", target="old")]
    held += [h("r_gone", 4, 3, kind="reaction", target="never")]
    held += [h("x", 5, 4, kind="redaction", target="r_old")]  # cascades
    plan = plan_release(held, cap=1)
    assert ids(plan) == ["new"]
    assert plan.reasons() == {policy.CAP: 1, policy.TARGET_CUT: 2, policy.TARGET_MISSING: 1}


def test_dependent_on_a_message_bridged_earlier_is_released() -> None:
    plan = plan_release([h("r", 9, 0, kind="reaction", target="old")], bridged={"old"})
    assert ids(plan) == ["r"]


def test_catch_up_discards_up_to_last_bridged_by_id_not_ts_alone() -> None:
    held = [h("a", 1, 0), h("b", 5, 1), h("b2", 5, 2), h("c", 6, 3), h("d", 7, 4)]
    plan = plan_release(held, last_bridged_ts=5, bridged={"b"}, cap=10)
    assert ids(plan) == ["b2", "c", "d"]
    assert plan.reasons() == {policy.BEFORE_LAST_BRIDGED: 2}
    # capped: newest N newer than the last bridged one
    assert ids(plan_release(held, last_bridged_ts=5, bridged={"b"}, cap=2)) == ["c", "d"]
    # a reaction to a message at/before the cut is fine: it is in the room
    plan = plan_release(
        [h("a", 1, 0), h("r", 8, 1, kind="reaction", target="a")], last_bridged_ts=2
    )
    assert ids(plan) == ["r"]


def test_backfill_disabled_releases_only_live() -> None:
    held = [h("a", 1, 0), h("l", 2, 1, live=True)]
    plan = plan_release(held, backfill_enabled=False)
    assert ids(plan) == ["l"] and plan.reasons() == {policy.BACKFILL_DISABLED: 1}


def test_live_decision() -> None:
    assert live_decision(h("m", 1), sent=(), held=()) is None
    r = h("r", 1, kind="reaction", target="t")
    assert live_decision(r, sent={"t"}, held=()) is None
    assert live_decision(r, sent=(), held={"t"}) == "hold"
    assert live_decision(r, sent=(), held=()) == policy.TARGET_MISSING


def test_advance_produced_moves_over_contiguous_seqs_and_keeps_the_rest() -> None:
    assert policy.advance_produced(0, [], [1, 2, 3]) == (3, [])
    # a failed produce: 3 and 5 reached the log, 2 and 4 did not
    assert policy.advance_produced(1, [], [3, 5]) == (1, [3, 5])
    assert policy.advance_produced(1, [3, 5], [2]) == (3, [5])
    assert policy.advance_produced(3, [5], [4, 6]) == (6, [])
    # seqs already at or below the mark (read back twice) change nothing
    assert policy.advance_produced(6, [], [2, 6]) == (6, [])


def test_rank_portals_newest_first_ties_by_key() -> None:
    newest = [("n:a", 5), ("n:b", 9), ("n:c", 5), ("n:d", None)]
    assert rank_portals(newest, 2) == ["n:b", "n:a"]
    assert rank_portals(newest, 0) == []
    assert rank_portals(newest, -1) == ["n:b", "n:a", "n:c", "n:d"]


def test_send_command_bytes_match_the_codec() -> None:
    m = msg("p", "m1", 1_700_000_000_000)
    assert send_command(encode(m), 42) == encode(SendMessage(message=m, seq=42))


def test_a_stored_record_is_sent_as_published_unless_near_the_size_limit() -> None:
    m = msg("p", "m1", 1_700_000_000_000)
    # A connector's own spelling (key order, spacing) survives; the sink decodes it.
    raw = b'{"ts": 1700000000000, "type": "message", "network": "testnet", "portal": "p", ' + (
        b'"id": "m1", "sender": {"id": "alice"}, "content": {"kind": "text", "body": "hi"}}'
    )
    item = Incoming(decode(raw), "history", 0, 7, raw)
    assert stored_record(item) == raw
    assert decode(send_command(stored_record(item), 3)) == SendMessage(
        message=decode(raw), seq=3
    )
    # Near the limit the SendMessage wrapper would not fit: re-encoded by the codec.
    inline = "A" * (MAX_RECORD_BYTES - 400)  # base64 media bytes
    big = replace(m, content=Content(kind="media", media_type="file", data=inline))
    fill = MAX_RECORD_BYTES - 50 - len(encode(big)) - len(b', "unknown": ""')
    padded = encode(big)[:-1] + b', "unknown": "' + b"y" * fill + b'"}'
    assert MAX_RECORD_BYTES - 100 < len(padded) <= MAX_RECORD_BYTES
    item = Incoming(decode(padded), "history", 0, 8, padded)
    assert stored_record(item) == encode(big)


def test_resume_finishes_a_hand_stepped_coroutine_like_a_task() -> None:
    """pipeline.app._resume (fast delivery): result, error and cancellation."""

    async def waits(delay: float, fail: bool = False) -> int:
        await asyncio.wait([asyncio.ensure_future(asyncio.sleep(delay))])
        await asyncio.sleep(0)  # a bare yield
        if fail:
            raise ValueError("boom")
        return 42

    async def started(coro):  # type: ignore[no-untyped-def]
        return asyncio.ensure_future(_resume(coro, coro.send(None)))

    async def main() -> None:
        assert await (await started(waits(0.01))) == 42
        with pytest.raises(ValueError):
            await (await started(waits(0.01, fail=True)))
        cleaned: list[bool] = []

        async def cancellable() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                cleaned.append(True)

        task = await started(cancellable())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]

    asyncio.run(main())
