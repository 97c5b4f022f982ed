"""The catch-up replay decision (backflow.replay_plan.plan_catchup), directly."""

from __future__ import annotations

from dataclasses import replace

import orjson
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from backflow.replay import start_offsets
from backflow.replay_plan import DELIVERED, DUPLICATE, QUEUED, plan_catchup, plan_rebuild
from pipeline.portal import BEFORE_LAST_BRIDGED, CAP, TARGET_MISSING, advance_produced
from pipeline.runtime import read_back
from tests.sink_helpers import BASE_TS, message, text
from topics.codec import encode
from topics.records import Content, CreateRoom, SendMessage
from topics.settings import BackfillSettings

P = "room"
DEFAULTS = BackfillSettings()


def ids(plan) -> list[str]:  # noqa: ANN001
    return [f"{m.id}/{m.part}" if m.part else m.id for m in plan.send]


def history(n: int) -> list:
    return [text(P, f"m{i}", "ann", BASE_TS + i * 1000, f"body {i}") for i in range(1, n + 1)]


def test_sends_only_what_is_missing_and_newer_than_the_last_bridged() -> None:
    log = history(6)
    # The room got m1, m2, m4; m3 was lost but is older than m4: Matrix cannot
    # insert it there. m5, m6 never arrived.
    delivered = {("m1", 0), ("m2", 0), ("m4", 0)}
    plan = plan_catchup(log, delivered=delivered, last_bridged_ts=log[3].ts, backfill=DEFAULTS)
    assert ids(plan) == ["m5", "m6"]
    assert plan.skipped == {DELIVERED: 3, BEFORE_LAST_BRIDGED: 1}


def test_a_second_run_after_delivery_sends_nothing() -> None:
    log = history(4)
    first = plan_catchup(log, delivered={("m1", 0)}, last_bridged_ts=log[0].ts, backfill=DEFAULTS)
    assert ids(first) == ["m2", "m3", "m4"]
    after = {("m1", 0)} | {(m.id, m.part) for m in first.send}
    second = plan_catchup(log, delivered=after, last_bridged_ts=log[3].ts, backfill=DEFAULTS)
    assert second.send == [] and second.skipped == {DELIVERED: 4}
    # Published but not applied by the sink yet: not published again either.
    queued = plan_catchup(
        log,
        delivered={("m1", 0)},
        last_bridged_ts=log[0].ts,
        backfill=DEFAULTS,
        queued={(m.id, m.part) for m in first.send},
    )
    assert queued.send == [] and queued.skipped == {DELIVERED: 1, QUEUED: 3}


def test_same_timestamp_as_the_last_bridged_is_decided_by_id() -> None:
    a = text(P, "a", "ann", BASE_TS, "a")
    b = text(P, "b", "bob", BASE_TS, "b, same millisecond")
    plan = plan_catchup([a, b], delivered={("a", 0)}, last_bridged_ts=BASE_TS, backfill=DEFAULTS)
    assert ids(plan) == ["b"]


def test_capped_like_catch_up_and_like_a_new_room_when_empty() -> None:
    log = history(10)
    capped = BackfillSettings(max_catchup_messages=3, max_initial_messages=5)
    plan = plan_catchup(log, delivered={("m1", 0)}, last_bridged_ts=log[0].ts, backfill=capped)
    assert ids(plan) == ["m8", "m9", "m10"]
    assert plan.skipped == {DELIVERED: 1, CAP: 6}
    empty = plan_catchup(log, delivered=set(), last_bridged_ts=None, backfill=capped)
    assert ids(empty) == ["m6", "m7", "m8", "m9", "m10"]
    # Live messages are not backfill: never capped.
    live = [replace(m, history=False) for m in history(4)]
    plan = plan_catchup(live, delivered=set(), last_bridged_ts=None, backfill=capped)
    assert len(plan.send) == 4


def test_order_is_network_time_and_duplicates_in_the_log_count_once() -> None:
    m1, m2, m3 = history(3)
    plan = plan_catchup([m3, m1, m2, m1], delivered=set(), last_bridged_ts=None, backfill=DEFAULTS)
    assert ids(plan) == ["m1", "m2", "m3"]
    assert plan.skipped == {DUPLICATE: 1}


def test_multi_part_messages_and_dependents() -> None:
    m1 = text(P, "m1", "ann", BASE_TS, "in the room already")
    p0 = text(P, "m2", "bob", BASE_TS + 1000, "caption")
    p1 = text(P, "m2", "bob", BASE_TS + 1000, "second part", part=1)
    like = message(P, "r1", "cy", BASE_TS + 2000, Content(kind="reaction", target="m1", key="+"))
    edit = message(P, "e1", "bob", BASE_TS + 3000, Content(kind="edit", target="m2", body="x"))
    stray = message(P, "r2", "cy", BASE_TS + 4000, Content(kind="reaction", target="gone", key="+"))
    plan = plan_catchup(
        [m1, p0, p1, like, edit, stray],
        delivered={("m1", 0), ("m2", 0)},
        last_bridged_ts=BASE_TS + 1000,
        backfill=DEFAULTS,
    )
    # m2's second part went missing at the last bridged ts: sent; the reaction
    # to a delivered message and the edit of m2 follow; one to nothing does not.
    assert ids(plan) == ["m2/1", "r1", "e1"]
    assert plan.skipped == {DELIVERED: 2, TARGET_MISSING: 1}


def test_backfill_disabled_sends_only_live_messages() -> None:
    m1, m2 = history(2)
    live = replace(m2, id="l1", history=False)
    off = BackfillSettings(enabled=False)
    plan = plan_catchup([m1, m2, live], delivered=set(), last_bridged_ts=None, backfill=off)
    assert ids(plan) == ["l1"]


def test_replay_commands_are_outside_the_pipelines_numbering() -> None:
    # The pipeline's read-back of the command log marks the seqs it finds as
    # produced; a replay command (seq 0) must never stand in for one of its own.
    assert advance_produced(0, [], [0]) == (0, [])
    assert advance_produced(3, [5], [0, 0]) == (3, [5])
    m = text(P, "m1", "ann", BASE_TS, "x")
    assert read_back(orjson.loads(encode(SendMessage(m, 0)))) is None
    assert read_back(orjson.loads(encode(SendMessage(m, 7)))) == (m.key, 7)
    # A rebuild's create_room is not the portal's own: were it taken for it, a
    # portal still waiting for its room would never get its CreateRoom out.
    create = CreateRoom(network=m.network, portal=P)
    assert read_back(orjson.loads(encode(create))) == (m.key, None)
    for step in ({"rebuild": "abc"}, {"finish_rebuild": "abc"}):
        assert read_back(orjson.loads(encode(replace(create, **step)))) is None


def test_start_offsets_from_offsets_for_times_answers() -> None:
    a, b, c, d = (TopicPartition("t.history", p) for p in range(4))
    begins = {a: 0, b: 10, c: 0, d: 0}
    ends = {a: 50, b: 40, c: 0, d: 30}
    # Apache Kafka: a has records from offset 17 on at that time; b has none
    # that new (and answers the probe for time 0); c is empty; d is blind.
    found = {a: OffsetAndTimestamp(17, 1_700_000_000_000), b: None, c: None, d: None}
    probe = {b: OffsetAndTimestamp(10, 1_600_000_000_000), d: None}
    assert start_offsets([a, b, c, d], found, probe, begins, ends) == {a: 17, b: 40, c: 0, d: 0}


def test_rebuild_takes_the_full_history_capped_as_a_new_room() -> None:
    log = history(6)
    plan = plan_rebuild([*log, log[2]], backfill=DEFAULTS)
    assert ids(plan) == ["m1", "m2", "m3", "m4", "m5", "m6"]
    assert plan.skipped == {DUPLICATE: 1}
    capped = BackfillSettings(max_initial_messages=4, max_catchup_messages=1)
    assert ids(plan_rebuild(log, backfill=capped)) == ["m3", "m4", "m5", "m6"]


def test_a_resumed_rebuild_continues_the_same_selection() -> None:
    log = history(10)
    capped = BackfillSettings(max_initial_messages=5)
    # Interrupted after m6 and m7 reached the new room, m8 on its way: the cap
    # is still over the whole history (not over what is left), so m1..m5 stay out.
    plan = plan_rebuild(
        log,
        delivered={("m6", 0), ("m7", 0)},
        last_bridged_ts=log[6].ts,
        queued={("m8", 0)},
        backfill=capped,
    )
    assert ids(plan) == ["m9", "m10"]
    assert plan.skipped == {CAP: 5, DELIVERED: 2, QUEUED: 1}
    done = plan_rebuild(
        log, delivered={(m.id, 0) for m in log[5:]}, last_bridged_ts=log[9].ts, backfill=capped
    )
    assert done.send == []
