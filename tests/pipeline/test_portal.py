"""The portal state machine and release planning (pipeline.portal), pure: no services."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pipeline import portal as policy
from pipeline.faust_compat import _resume
from pipeline.portal import (
    ALL_PRODUCED,
    ROOM_REQUESTED,
    ROOM_STATES,
    Forward,
    Held,
    Portal,
    PortalState,
    Release,
    after_release,
    live_decision,
    lookups,
    plan_release,
    plan_round,
    rank_portals,
    request_room,
)
from tests.pipeline_support import msg
from topics.codec import MAX_RECORD_BYTES, decode, encode, send_command, stored_message
from topics.records import Content, SendMessage
from topics.settings import BackfillSettings


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
    assert stored_message(decode(raw), raw) == raw
    assert decode(send_command(stored_message(decode(raw), raw), 3)) == SendMessage(
        message=decode(raw), seq=3
    )
    # Near the limit the SendMessage wrapper would not fit: re-encoded by the codec.
    inline = "A" * (MAX_RECORD_BYTES - 400)  # base64 media bytes
    big = replace(m, content=Content(kind="media", media_type="file", data=inline))
    fill = MAX_RECORD_BYTES - 50 - len(encode(big)) - len(b', "unknown": ""')
    padded = encode(big)[:-1] + b', "unknown": "' + b"y" * fill + b'"}'
    assert MAX_RECORD_BYTES - 100 < len(padded) <= MAX_RECORD_BYTES
    assert stored_message(decode(padded), padded) == encode(big)


def test_resume_finishes_a_hand_stepped_coroutine_like_a_task() -> None:
    """pipeline.faust_compat._resume (fast delivery): result, error and cancellation."""

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


# ---------------------------------------------------------------- state machine


def portal_row(state: str = "held", **kw: object) -> Portal:
    values: dict[str, object] = {
        "key": "net:p",
        "state": state,
        "room_requested": False,
        "room_id": None,
        "alias": None,
        "next_seq": 1,
        "last_bridged_ts": None,
        "last_bridged_id": None,
        "next_arrival": 1,
        "history_decided": 0,
        "live_decided": 0,
        "held_history": 0,
    }
    values.update(kw)
    return Portal(**values)  # type: ignore[arg-type]


def test_state_values_are_what_status_shows() -> None:
    assert [s.value for s in PortalState] == [
        "held",
        "waiting_for_room",
        "backfilling",
        "live",
    ]
    assert ROOM_STATES == {PortalState.BACKFILLING, PortalState.LIVE}


def test_request_room_moves_only_a_held_portal_to_waiting() -> None:
    p = portal_row()
    request_room(p)
    assert p.room_requested and p.state == PortalState.WAITING
    for state in (PortalState.WAITING, PortalState.BACKFILLING, PortalState.LIVE):
        p = portal_row(state)
        request_room(p)
        assert p.room_requested and p.state == state


def test_release_backfills_a_new_room_and_keeps_a_live_one_live() -> None:
    assert after_release(PortalState.WAITING) == PortalState.BACKFILLING
    assert after_release(PortalState.HELD) == PortalState.BACKFILLING
    assert after_release(PortalState.BACKFILLING) == PortalState.BACKFILLING
    assert after_release(PortalState.LIVE) == PortalState.LIVE


def test_guarded_transitions() -> None:
    assert ROOM_REQUESTED.apply("held") == PortalState.WAITING
    assert ROOM_REQUESTED.apply("live") == PortalState.LIVE
    assert ALL_PRODUCED.apply("backfilling") == PortalState.LIVE
    assert ALL_PRODUCED.apply("waiting_for_room") == PortalState.WAITING


# ---------------------------------------------------------------- one round


def release(**kw: object) -> Release:
    values: dict[str, object] = {
        "upto": 10,
        "history_decided": 0,
        "live_decided": 0,
        "catch_up": False,
        "last_ts": None,
        "portal_ts": False,
    }
    values.update(kw)
    return Release(**values)  # type: ignore[arg-type]


def test_plan_round_assigns_seqs_and_advances_the_portal() -> None:
    p = portal_row("waiting_for_room", next_seq=5)
    held = {"net:p": [h("a", 1, 0, arrival=1), h("b", 3, 1, arrival=2), h("c", 2, 2, arrival=3)]}
    backfill = BackfillSettings(max_initial_messages=2)
    [d] = plan_round([(p, release())], [], held, {}, backfill)
    assert d.first_seq == 5 and [m.id for m in d.release] == ["c", "b"] and d.unhold
    assert [(m.id, r) for m, r in d.dropped] == [("a", policy.CAP)]
    assert p.next_seq == 7 and (p.last_bridged_ts, p.last_bridged_id) == (3, "b")
    assert p.dropped == {policy.CAP: 1}


def test_plan_round_catch_up_uses_statuses_it_looked_up() -> None:
    p = portal_row("live", last_bridged_ts=5, last_bridged_id="x")
    a = release(catch_up=True, portal_ts=True)
    held = {"net:p": [h("y", 5, 0, arrival=4), h("z", 6, 1, arrival=5)]}
    assert lookups([(p, a)], [], held) == [("net:p", "y", 0, 0)]
    status = {("net:p", "y"): {policy.STATUS_RELEASED}}
    [d] = plan_round([(p, a)], [], held, status, BackfillSettings())
    assert [m.id for m in d.release] == ["z"]
    assert [(m.id, r) for m, r in d.dropped] == [("y", policy.BEFORE_LAST_BRIDGED)]


def test_plan_round_forwards_holds_back_and_drops_live_dependents() -> None:
    p = portal_row("live", next_seq=3)
    msgs = [
        h("m", 1, 0, live=True, arrival=7),
        h("r1", 2, 1, live=True, kind="reaction", target="m", arrival=8),
        h("r2", 2, 2, live=True, kind="reaction", target="held", arrival=9),
        h("r3", 2, 3, live=True, kind="reaction", target="gone", arrival=10),
    ]
    f = Forward(msgs=msgs, history_decided=0, live_decided=6)
    assert sorted(i for _, i, _, _ in lookups([], [(p, f)], {})) == ["gone", "held", "m"]
    status = {("net:p", "held"): {policy.STATUS_HELD}}
    [d] = plan_round([], [(p, f)], {}, status, BackfillSettings())
    assert [m.id for m in d.release] == ["m", "r1"] and d.first_seq == 3 and not d.unhold
    assert [m.id for m in d.holdback] == ["r2"]
    assert [(m.id, r) for m, r in d.dropped] == [("r3", policy.TARGET_MISSING)]
    assert p.next_seq == 5


def test_intake_rejects_nul_in_stored_text_fields() -> None:
    """U+0000 cannot be stored in Postgres text: refused before a batch is applied."""
    from types import SimpleNamespace

    from pipeline.intake import prepare

    bad = encode(msg("p\x00x", "m", 1_700_000_000_000))
    ok = encode(msg("p", "m", 1_700_000_000_000))
    records = [
        SimpleNamespace(topic="t-history", partition=2, offset=o, key=b"k", value=v)
        for o, v in enumerate((bad, ok))
    ]
    prepared = prepare(records, {"t-history": "history"})
    assert [i.offset for i in prepared.items] == [1]
    assert prepared.items[0].source == "t-history[2]@1"
    [letter] = prepared.letters
    assert letter.source == "t-history[2]@0" and "U+0000" in letter.reason
