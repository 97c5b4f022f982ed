"""Pure decisions of the portal pipeline: what to release, in which order, what to drop.

Nothing here touches Kafka or Postgres, so every rule is unit-tested directly
(tests/test_pipeline_policy.py). ``pipeline.state`` feeds these functions the
metadata of held messages (never their bodies) and writes the outcome back.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from topics.records import DEPENDENT_KINDS

# Reasons a held message is dropped instead of released (counted per portal).
CAP = "cap"  # older than the newest max_initial/max_catchup messages
BEFORE_LAST_BRIDGED = "before_last_bridged"  # the room already has it or newer (catch-up)
TARGET_CUT = "target_cut"  # reaction/edit/redaction whose target was cut by a cap
TARGET_MISSING = "target_missing"  # ... whose target never arrived
BACKFILL_DISABLED = "backfill_disabled"  # history while backfill.enabled is false
DROP_REASONS = (CAP, BEFORE_LAST_BRIDGED, TARGET_CUT, TARGET_MISSING, BACKFILL_DISABLED)


@dataclass(slots=True)  # not frozen: construction is ~9x cheaper (100k per release run)
class Held:
    """Metadata of one held message part (the encoded record stays in Postgres).

    Field order matches pipeline.state.HELD_ROWS, which builds these positionally.
    """

    id: str
    part: int
    ts: int
    ord: int  # original order: the record's offset in its topic partition
    live: bool = False
    kind: str = "text"
    target: str | None = None
    arrival: int = 0  # its row in the hold store (pipeline.state)

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

    Returns None to forward now, "hold" when a dependent's target is still held
    (it goes out with the target's next release), else a drop reason.
    """
    if not msg.dependent:
        return None
    if msg.target in sent:
        return None
    if msg.target in held:
        return "hold"
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
