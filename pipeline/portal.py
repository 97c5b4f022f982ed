"""The portal state machine and release planning: pure, no I/O.

Everything the pipeline decides about a portal is here, unit-tested directly
(tests/pipeline/test_portal.py):

- ``PortalState`` and its transitions (``request_room``, ``after_release``,
  ``ROOM_REQUESTED``/``ALL_PRODUCED`` for the store's guarded updates);
- ``Portal``, the locked row a batch advances in memory, and the actions a
  batch asks of it (``Release``, ``Forward``; built by ``pipeline.batch.walk``);
- the release plan (``plan_release``: order, caps, dependents, catch-up), the
  live decision (``live_decision``) and ``plan_round``, which turns one round
  of actions plus what the hold store read into ``Decision``s;
- the sync ranking (``rank_portals``) and the outbox watermark
  (``advance_produced``).

The hold store (``pipeline.hold``) reads held rows' metadata, calls these and
writes the outcome back; its SQL never restates a rule made here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from topics.records import DEPENDENT_KINDS, RoomCreated
from topics.settings import BackfillSettings

# ---------------------------------------------------------------- states


class PortalState(StrEnum):
    """A portal's state (stored in pipeline_portal.state, shown by `backflow status`)."""

    HELD = "held"  # no room requested yet
    WAITING = "waiting_for_room"  # CreateRoom requested, RoomCreated not seen
    BACKFILLING = "backfilling"  # released commands not all produced yet
    LIVE = "live"  # room exists, everything produced; new messages are forwarded


# States in which the portal's room exists: live messages are forwarded.
ROOM_STATES = frozenset({PortalState.BACKFILLING, PortalState.LIVE})


@dataclass(frozen=True, slots=True)
class Transition:
    """A guarded state change: ``source`` becomes ``target``, any other state stays.

    The store applies these in SQL with the two values as parameters, for
    rows it updates without loading them (``state = CASE WHEN state = $a THEN $b``).
    """

    source: PortalState
    target: PortalState

    def apply(self, state: str) -> PortalState:
        return self.target if state == self.source else PortalState(state)


# The room was requested (by a live message, a HistoryComplete, the sync ranking).
ROOM_REQUESTED = Transition(PortalState.HELD, PortalState.WAITING)
# Every released command of a backfilling portal is in the command log.
ALL_PRODUCED = Transition(PortalState.BACKFILLING, PortalState.LIVE)


def after_release(state: str) -> PortalState:
    """A release into a new room shows BACKFILLING until the flush has the whole
    outbox in the log; a LIVE portal stays LIVE while catching up."""
    return PortalState.LIVE if state == PortalState.LIVE else PortalState.BACKFILLING


# Reasons a held message is dropped instead of released (counted per portal).
CAP = "cap"  # older than the newest max_initial/max_catchup messages
BEFORE_LAST_BRIDGED = "before_last_bridged"  # the room already has it or newer (catch-up)
TARGET_CUT = "target_cut"  # reaction/edit/redaction whose target was cut by a cap
TARGET_MISSING = "target_missing"  # ... whose target never arrived
BACKFILL_DISABLED = "backfill_disabled"  # history while backfill.enabled is false
DROP_REASONS = (CAP, BEFORE_LAST_BRIDGED, TARGET_CUT, TARGET_MISSING, BACKFILL_DISABLED)
# live_decision: a dependent whose target is still held waits for its release.
HOLD = "hold"


@dataclass(slots=True)  # not frozen: construction is ~9x cheaper (100k per release run)
class Held:
    """Metadata of one held message part (the encoded record stays in Postgres).

    Built by name from pipeline.hold.HELD_ROWS and by pipeline.batch.walk.
    """

    id: str
    part: int
    ts: int
    ord: int  # original order: the record's offset in its topic partition
    live: bool = False
    kind: str = "text"
    target: str | None = None
    arrival: int = 0  # its row in the hold store (pipeline.hold)

    @property
    def dependent(self) -> bool:
        return self.kind in DEPENDENT_KINDS and self.target is not None


def release_order(msg: Held) -> tuple[int, bool, int]:
    """Oldest first by network ts; ties: history before live, then original order."""
    return (msg.ts, msg.live, msg.ord)


@dataclass(slots=True)
class Plan:
    release: list[Held] = field(default_factory=list)  # in the order to send
    dropped: list[tuple[Held, str]] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, reason in self.dropped:
            out[reason] = out.get(reason, 0) + 1
        return out


def plan_release(
    held: Iterable[Held],
    *,
    cap: int = -1,
    last_bridged_ts: int | None = None,
    bridged: Collection[str] = (),
    backfill_enabled: bool = True,
) -> Plan:
    """Decide the release of a portal's held messages into its room.

    - ``cap`` keeps the newest N history messages (-1: all). Dependents
      (reactions, edits, redactions) do not count: they follow their target.
      Held *live* messages are never capped: they are not backfill.
    - ``last_bridged_ts`` (catch-up into a room that already has messages):
      messages before it are discarded; at the same ts only those whose id is
      known as bridged (``bridged``), so distinct messages sharing a timestamp
      are not lost (dedup by id, not by timestamp alone).
    - ``bridged``: message ids already in the room; dependents may point at them.
    - Dependents never go before their target: one that sorts earlier waits for
      it; one whose target was cut or never arrived is dropped with a reason.
    """
    ordered = sorted(held, key=release_order)
    plan = Plan()
    bridged_ids = set(bridged)
    candidates: list[Held] = []
    for msg in ordered:
        if last_bridged_ts is not None and (
            msg.ts < last_bridged_ts or (msg.ts == last_bridged_ts and msg.id in bridged_ids)
        ):
            plan.dropped.append((msg, BEFORE_LAST_BRIDGED))
            bridged_ids.add(msg.id)  # it is in the room: dependents may follow it
        elif not msg.live and not backfill_enabled:
            plan.dropped.append((msg, BACKFILL_DISABLED))
        else:
            candidates.append(msg)

    # Cap: keep the newest N history (non-dependent) messages. A multi-part
    # message counts once and is kept or cut as a whole.
    cut_ids: set[str] = set()
    if cap >= 0:
        kept_ids: set[str] = set()
        for msg in reversed(candidates):
            if msg.live or msg.dependent or msg.id in kept_ids:
                continue
            if len(kept_ids) < cap:
                kept_ids.add(msg.id)
            else:
                cut_ids.add(msg.id)
        cut_ids -= kept_ids
    kept: list[Held] = []
    for msg in candidates:
        if msg.id in cut_ids and not msg.dependent:
            plan.dropped.append((msg, CAP))
        else:
            kept.append(msg)

    # Dependents after their targets. A target counts as sent once its last
    # part is out; dependents waiting on it follow immediately, in order.
    remaining_parts: dict[str, int] = {}
    for msg in kept:
        remaining_parts[msg.id] = remaining_parts.get(msg.id, 0) + 1
    waiting: dict[str, list[Held]] = {}
    sent: set[str] = set()
    dropped_deps: dict[str, str] = {}  # dependent id -> why: its dependents share the fate

    def emit(msg: Held) -> None:
        plan.release.append(msg)
        remaining_parts[msg.id] -= 1
        if remaining_parts[msg.id] == 0:
            sent.add(msg.id)
            for dep in waiting.pop(msg.id, ()):
                emit(dep)

    def drop(msg: Held, reason: str) -> None:
        plan.dropped.append((msg, reason))
        dropped_deps[msg.id] = reason
        remaining_parts[msg.id] -= 1
        if remaining_parts[msg.id] == 0:
            for dep in waiting.pop(msg.id, ()):
                drop(dep, reason)

    for msg in kept:
        if not msg.dependent:
            emit(msg)
            continue
        target = msg.target
        assert target is not None
        if target in sent or target in bridged_ids:
            emit(msg)
        elif target == msg.id:
            drop(msg, TARGET_MISSING)  # points at itself: can never be satisfied
        elif remaining_parts.get(target, 0) > 0:
            waiting.setdefault(target, []).append(msg)
        elif target in cut_ids:
            drop(msg, TARGET_CUT)
        elif target in dropped_deps:
            drop(msg, dropped_deps[target])
        else:
            drop(msg, TARGET_MISSING)
    # Whatever still waits points at a target that was itself dropped later.
    for deps in list(waiting.values()):
        for dep in deps:
            plan.dropped.append((dep, TARGET_MISSING))
    return plan


def live_decision(msg: Held, *, sent: Collection[str], held: Collection[str]) -> str | None:
    """For a message arriving at a portal whose room exists: forward, hold or drop.

    Returns None to forward now, ``HOLD`` when a dependent's target is still held
    (it goes out with the target's next release), else a drop reason.
    """
    if not msg.dependent:
        return None
    if msg.target in sent:
        return None
    if msg.target in held:
        return HOLD
    return TARGET_MISSING


def rank_portals(newest: Sequence[tuple[str, int | None]], n: int) -> list[str]:
    """``max_initial_conversations``: the N portals with the most recent messages.

    ``newest`` is (portal key, newest message ts); -1 selects all. Ties are
    broken by key so every worker decides the same.
    """
    ranked = sorted(newest, key=lambda p: (-(p[1] or 0), p[0]))
    if n < 0:
        return [key for key, _ in ranked]
    return [key for key, _ in ranked[:n]]


def effective_cap(*, catch_up: bool, max_initial: int, max_catchup: int) -> int:
    """The cap for one release: catch-up into an existing room, or a new room."""
    return max_catchup if catch_up else max_initial


def advance_produced(
    done: int, extra: Iterable[int], found: Iterable[int]
) -> tuple[int, list[int]]:
    """Which of a portal's commands are in the log, after ``found`` seqs were seen there.

    Before: every seq up to ``done`` plus the seqs in ``extra``. Returns the new
    ``done`` (the highest seq with no gap below it) and the seqs beyond a gap,
    which a failed produce can leave (a later batch got in, an earlier one did
    not): those must not be produced again, the missing ones still must.
    """
    have = {seq for seq in (*extra, *found) if seq > done}
    while done + 1 in have:
        done += 1
        have.remove(done)
    return done, sorted(have)


# ---------------------------------------------------------------- a batch's actions


@dataclass(slots=True)
class Portal:
    """A locked portal row, advanced in memory through a batch, then written back.

    Built by name from the columns of the same names (pipeline.hold).
    """

    key: str
    state: str
    room_requested: bool
    room_id: str | None
    alias: str | None
    next_seq: int
    last_bridged_ts: int | None
    last_bridged_id: str | None
    # The hold (see pipeline/schema.py): rows are numbered as they arrive;
    # history above history_decided and live above live_decided are held.
    next_arrival: int
    history_decided: int
    live_decided: int
    held_history: int  # history rows above history_decided (may overcount duplicates)
    # What this batch adds, written back with the rest.
    info: bytes | None = None
    history_complete: bool = False
    sync: str | None = None
    room_created: bool = False
    newest_ts: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)


def request_room(portal: Portal) -> None:
    """The flag is the request; the outbox flush produces CreateRoom."""
    portal.room_requested = True
    portal.state = ROOM_REQUESTED.apply(portal.state)


@dataclass(slots=True)
class Release:
    """Release everything held up to arrival ``upto`` (a room_created, or a catch-up)."""

    upto: int
    history_decided: int  # the watermarks before it: rows above them are held
    live_decided: int
    catch_up: bool
    last_ts: int | None  # the room's newest bridged message (catch-up)
    portal_ts: bool  # catch-up after the portal's own last bridged message (known later)
    room: RoomCreated | None = None


@dataclass(slots=True)
class Forward:
    """Live messages for a portal whose room exists, in arrival order."""

    msgs: list[Held]
    history_decided: int  # the watermarks before them (what is held for a target lookup)
    live_decided: int


# ---------------------------------------------------------------- one round's plan

# What became of an earlier message part (pipeline.hold.ID_STATUS answers one
# of these or the drop reason).
STATUS_HELD = "held"
STATUS_RELEASED = "released"
# Statuses meaning the message is in the room (dependents may point at it).
IN_ROOM = frozenset({STATUS_RELEASED, BEFORE_LAST_BRIDGED})


@dataclass(slots=True)
class Decision:
    """What one round decided for one portal; the store only persists it."""

    portal: Portal
    first_seq: int  # ``release[i]`` gets seq ``first_seq + i``
    release: list[Held]
    dropped: list[tuple[Held, str]]
    holdback: list[Held] = field(default_factory=list)
    unhold: bool = False  # a release decided the portal's holdback rows too


def catch_up_ts(portal: Portal, release: Release) -> int | None:
    """The timestamp a release must not go below (None: a new room)."""
    return portal.last_bridged_ts if release.portal_ts else release.last_ts


def lookups(
    releases: Sequence[tuple[Portal, Release]],
    forwards: Sequence[tuple[Portal, Forward]],
    held: Mapping[str, Sequence[Held]],
) -> list[tuple[str, str, int, int]]:
    """Earlier messages the plans need the status of: (portal key, id, watermarks).

    Dependents' targets, and (catch-up) messages at the last bridged timestamp.
    """
    out: list[tuple[str, str, int, int]] = []
    for p, a in releases:
        ts = catch_up_ts(p, a)
        rows = held.get(p.key, ())
        ids = {m.target for m in rows if m.dependent}
        if ts is not None:
            ids |= {m.id for m in rows if m.ts == ts}
        out += [(p.key, i, a.history_decided, a.live_decided) for i in ids if i]
    for p, f in forwards:
        ids = {m.target for m in f.msgs if m.dependent}
        out += [(p.key, i, f.history_decided, f.live_decided) for i in ids if i]
    return out


def plan_round(
    releases: Sequence[tuple[Portal, Release]],
    forwards: Sequence[tuple[Portal, Forward]],
    held: Mapping[str, Sequence[Held]],
    status: Mapping[tuple[str, str], Collection[str]],
    backfill: BackfillSettings,
) -> list[Decision]:
    """Plan one round (at most one action per portal) and advance the portals.

    ``held``: per portal key, the held rows a release decides; ``status``: per
    (portal key, message id) the statuses of its parts, for the ids
    ``lookups`` asked for. Each portal's ``next_seq``, last bridged message and
    drop counts move as the decisions say.
    """

    def known(key: str, wanted: Collection[str]) -> set[str]:
        return {i for (k, i), st in status.items() if k == key and not set(st).isdisjoint(wanted)}

    out: list[Decision] = []
    for p, a in releases:
        bridged = known(p.key, IN_ROOM)
        if p.last_bridged_id is not None and a.catch_up:
            bridged.add(p.last_bridged_id)
        plan = plan_release(
            held.get(p.key, ()),
            cap=effective_cap(
                catch_up=a.catch_up,
                max_initial=backfill.max_initial_messages,
                max_catchup=backfill.max_catchup_messages,
            ),
            last_bridged_ts=catch_up_ts(p, a),
            bridged=bridged,
            backfill_enabled=backfill.enabled,
        )
        out.append(_decided(p, plan.release, plan.dropped, unhold=True))
    for p, f in forwards:
        sent, waiting = known(p.key, IN_ROOM), known(p.key, (STATUS_HELD,))
        release: list[Held] = []
        dropped: list[tuple[Held, str]] = []
        holdback: list[Held] = []
        for m in f.msgs:
            decision = live_decision(m, sent=sent, held=waiting)
            if decision is None:
                release.append(m)
                sent.add(m.id)
            elif decision == HOLD:
                holdback.append(m)
            else:
                dropped.append((m, decision))
        out.append(_decided(p, release, dropped, holdback=holdback))
    return out


def _decided(
    portal: Portal,
    release: list[Held],
    dropped: list[tuple[Held, str]],
    *,
    holdback: list[Held] | None = None,
    unhold: bool = False,
) -> Decision:
    """Give ``release`` the portal's next seqs and count the rest on the portal."""
    decision = Decision(portal, portal.next_seq, release, dropped, holdback or [], unhold)
    portal.next_seq += len(release)
    newest = max(release, key=release_order, default=None)
    if newest is not None and (
        portal.last_bridged_ts is None or newest.ts >= portal.last_bridged_ts
    ):
        portal.last_bridged_ts, portal.last_bridged_id = newest.ts, newest.id
    for _, reason in dropped:
        portal.dropped[reason] = portal.dropped.get(reason, 0) + 1
    return decision
