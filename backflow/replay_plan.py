"""What `backflow replay --mode catchup` sends into a portal's room: pure, no I/O.

Given a portal's messages as the log has them, what the sink's message map
says the room has, the newest network timestamp bridged there, and the
backfill caps, decide which messages to send and why each other one is not.
The I/O around it (reading the log and the map, publishing) is
backflow/replay.py; tests/backflow/test_replay_plan.py tests this directly.

The release rules are the pipeline's own (``pipeline.portal.plan_release``:
order, caps, dependents after their targets); this adds only what a replay
knows and a hold store does not: the message map.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.portal import BEFORE_LAST_BRIDGED, Held, effective_cap, plan_release
from topics.records import NetworkMessage
from topics.settings import BackfillSettings

# Reasons a logged message is not sent, besides the pipeline's (pipeline.portal).
DELIVERED = "delivered"  # the message map has it in this room
QUEUED = "queued"  # a replay command for it is in the command log, not yet applied
DUPLICATE = "duplicate"  # the same (message id, part) appeared earlier in the log


@dataclass(slots=True)
class CatchupPlan:
    send: list[NetworkMessage] = field(default_factory=list)  # in the order to send
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count


def part_key(message: NetworkMessage) -> tuple[str, int]:
    """How the message map names a sent message part."""
    return (message.id, message.part)


def plan_catchup(
    messages: Iterable[NetworkMessage],
    *,
    delivered: Collection[tuple[str, int]],
    last_bridged_ts: int | None,
    backfill: BackfillSettings,
    queued: Collection[tuple[str, int]] = (),
) -> CatchupPlan:
    """The messages a catch-up replay sends into the portal's existing room.

    - ``messages``: the portal's messages in log order (history and live).
    - ``delivered``: (message id, part) the sink's map has in this room; never
      sent again, and dependents (reactions, edits, redactions) may point at them.
    - ``last_bridged_ts``: the newest network ts in the room (None: empty room).
      Matrix only appends, so anything older is skipped; at the same ts what
      is not delivered is sent (dedup by id, not by timestamp).
    - Capped like the pipeline's catch-up: ``max_catchup_messages`` newest
      history messages into a room that has messages, ``max_initial_messages``
      into an empty one; live messages are never capped.
    - ``queued``: parts a previous replay already published that the sink has
      not applied yet: not published twice.
    """
    plan = CatchupPlan()
    candidates: list[Held] = []
    by_ord: list[NetworkMessage] = []
    for key, msg in _first_of_each_part(messages, plan):
        if key in delivered:
            plan.skipped[DELIVERED] += 1
        elif key in queued:
            plan.skipped[QUEUED] += 1
        elif last_bridged_ts is not None and msg.ts < last_bridged_ts:
            plan.skipped[BEFORE_LAST_BRIDGED] += 1
        else:
            candidates.append(_held(msg, len(by_ord)))
            by_ord.append(msg)
    cap = effective_cap(
        catch_up=last_bridged_ts is not None,
        max_initial=backfill.max_initial_messages,
        max_catchup=backfill.max_catchup_messages,
    )
    # Targets already in the room, or on their way there, satisfy dependents.
    bridged = {k[0] for k in delivered} | {k[0] for k in queued}
    released = plan_release(candidates, cap=cap, bridged=bridged, backfill_enabled=backfill.enabled)
    plan.send = [by_ord[h.ord] for h in released.release]
    plan.skipped.update(released.reasons())
    return plan


def _first_of_each_part(
    messages: Iterable[NetworkMessage], plan: CatchupPlan
) -> Iterator[tuple[tuple[str, int], NetworkMessage]]:
    """(part key, message) for the first record of each part; later ones count as duplicates."""
    seen: set[tuple[str, int]] = set()
    for msg in messages:
        key = part_key(msg)
        if key in seen:
            plan.skipped[DUPLICATE] += 1
            continue
        seen.add(key)
        yield key, msg


def plan_rebuild(
    messages: Iterable[NetworkMessage],
    *,
    delivered: Collection[tuple[str, int]] = (),
    last_bridged_ts: int | None = None,
    backfill: BackfillSettings,
    queued: Collection[tuple[str, int]] = (),
) -> CatchupPlan:
    """The messages a rebuild sends into the portal's fresh room.

    The whole history, capped as for a new room (``max_initial_messages``
    newest history messages; live ones never capped), in the pipeline's
    order. The cap is taken over the whole log first and only then is what
    the new room already has (``delivered``, ``last_bridged_ts``: of the NEW
    room) or what is on its way (``queued``) taken out, so a resumed rebuild
    continues the very selection it started with.
    """
    plan = CatchupPlan()
    held: list[Held] = []
    by_ord: list[NetworkMessage] = []
    for _, msg in _first_of_each_part(messages, plan):
        held.append(_held(msg, len(by_ord)))
        by_ord.append(msg)
    released = plan_release(
        held, cap=backfill.max_initial_messages, backfill_enabled=backfill.enabled
    )
    plan.skipped.update(released.reasons())
    for h in released.release:
        msg = by_ord[h.ord]
        key = part_key(msg)
        if key in delivered:
            plan.skipped[DELIVERED] += 1
        elif key in queued:
            plan.skipped[QUEUED] += 1
        elif last_bridged_ts is not None and msg.ts < last_bridged_ts:
            plan.skipped[BEFORE_LAST_BRIDGED] += 1
        else:
            plan.send.append(msg)
    return plan


def _held(msg: NetworkMessage, ord_: int) -> Held:
    c = msg.content
    return Held(
        id=msg.id,
        part=msg.part,
        ts=msg.ts,
        ord=ord_,
        live=not msg.history,
        kind=c.kind,
        target=c.target,
    )
