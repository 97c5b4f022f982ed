"""``backflow import whatsapp-history SOURCE --follow``: capture rows before the bridge deletes.

mautrix-whatsapp keeps history-sync rows only until it has backfilled a chat,
and WhatsApp sends them once. Following the database publishes every new row
into the log within ``interval`` seconds, one publish run per round that
found something, and prints one line per captured sync. The runs leave out
their ``history_complete`` markers: those go out for every chat captured
since, as one sync, once nothing came for ``dispatch_wait`` seconds (as
mautrix-whatsapp ranks a history sync only after a minute of quiet), so
``max_initial_conversations`` ranks a sync that arrived in pieces as a whole.

Position: the newest ``inserted_time`` published, saved (with the keys of the
rows inside the overlap window and the chats awaiting their markers) only
after the broker acknowledged the round,
in a JSON file under the state directory. Each round re-reads
``OVERLAP_S`` seconds before the position, so a row committed late with an
older ``inserted_time`` is not a gap, and skips the keys it already
published, so nothing is published twice; a restart resumes from the file.
Should the file be lost, re-published rows carry the same ids and the
pipeline drops them. A database (or broker) that goes away is retried with
the one retry policy's capped backoff; the position does not move meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from connectors.publish import describe_kinds, publish_complete, publish_source
from connectors.source import Source, SourceError, SourceItem
from connectors.sources.wa_bridge_db import BRIDGEV2, BridgeDB, open_db, redact
from connectors.sources.whatsapp_history import Position, WhatsAppHistorySource
from topics.retry import RetryPolicy, retry
from topics.settings import Settings

log = logging.getLogger("backflow.whatsapp_history")
POLICY = RetryPolicy(first_delay=1.0, max_delay=30.0, give_up_after=24 * 3600.0)
# mautrix-whatsapp's history_sync.dispatch_wait: quiet before chats are ranked.
DISPATCH_WAIT_S = 60.0
Echo = Callable[[str], None]


def position_path(settings: Settings, location: str, options: dict[str, str]) -> Path:
    """Where a followed database's position is kept (option ``position`` overrides)."""
    if options.get("position"):
        return Path(options["position"])
    scope = "\0".join((redact(location), options.get("bridge_id", ""), options.get("login", "")))
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    return Path(settings.state_dir) / "whatsapp-history" / f"{digest}.json"


Pending = dict[tuple[str, str], int]  # (network, portal) -> messages awaiting their marker


def load(path: Path) -> tuple[Position | None, Pending]:
    """The saved position and the portals whose markers are still to be published."""
    try:
        data = json.loads(path.read_text())
        position = Position(
            int(data["inserted_time"]), {tuple(k[:5]): int(k[5]) for k in data.get("seen", [])}
        )
        pending = {(str(n), str(p)): int(c) for n, p, c in data.get("pending", [])}
        return position, pending
    except FileNotFoundError:
        return None, {}
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise SourceError(
            f"{path}: not a follow position ({exc}); move it away to start over"
        ) from None


def save(path: Path, position: Position, pending: Pending) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "inserted_time": position.inserted_time,
        "seen": [[*key, t] for key, t in sorted(position.seen.items())],
        "pending": [[n, p, c] for (n, p), c in sorted(pending.items())],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the old position


class _Primed(Source):
    """A source whose first item was already read (to learn whether there is anything)."""

    def __init__(self, inner: WhatsAppHistorySource, first: SourceItem, rest: Iterator) -> None:
        super().__init__(inner.path, inner.options)
        self.inner, self.first, self.rest = inner, first, rest
        self.name, self.network, self.stats = inner.name, inner.network, inner.stats

    @property
    def at(self) -> str | None:  # type: ignore[override]
        return self.inner.at

    @at.setter
    def at(self, value: str | None) -> None:
        pass  # the inner source keeps it

    def read(self) -> Iterator[SourceItem]:
        yield self.first
        yield from self.rest


class Follower:
    def __init__(
        self,
        location: str,
        options: dict[str, str],
        settings: Settings,
        echo: Echo = print,
        interval: float = 2.0,
        dispatch_wait: float = DISPATCH_WAIT_S,
    ) -> None:
        self.location, self.options, self.settings = location, options, settings
        self.echo, self.interval, self.dispatch_wait = echo, interval, dispatch_wait
        self.path = position_path(settings, location, options)
        self.position, self.pending = load(self.path)
        self.last_capture = time.monotonic()
        self.sync: str | None = None  # the id of the markers being published (kept on retry)
        self.db: BridgeDB | None = None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    async def round(self) -> int:
        """Publish what is new since the position; the rows captured (0: nothing new)."""
        try:
            if self.db is None:
                self.db = open_db(self.location)
                if self.db.schema != BRIDGEV2:  # say so before importing anything
                    raise SourceError(
                        f"{redact(self.location)}: --follow needs the bridgev2 schema (its "
                        "inserted_time is the position); this is the legacy bridge's database: "
                        "import it once without --follow"
                    )
            source = WhatsAppHistorySource(
                self.location, self.options, since=self.position, db=self.db, remember=True
            )
            items = source.read()
            first = next(items, None)
            if first is None:  # nothing new (the generator ran to its end)
                assert source.position is not None
                self._advance(source.position)
                return 0
            # Markers wait for quiet (complete): the chats of one history sync
            # are ranked together, as mautrix does after dispatch_wait.
            primed = _Primed(source, first, items)
            summary = await publish_source(primed, self.settings, complete=False)
        except Exception:
            self.close()  # reconnect on the next attempt
            raise
        assert source.position is not None
        for portal, count in summary.counts.items():
            self.pending[portal] = self.pending.get(portal, 0) + count
        self.last_capture = time.monotonic()
        self._advance(source.position, force=True)
        self.echo(
            f"captured {source.captured} history-sync rows: {describe_kinds(summary.kinds)} in "
            f"{summary.portals} chats, {summary.rejected} rejected "
            f"(position inserted_time={source.position.inserted_time})"
        )
        return source.captured

    def _advance(self, position: Position, force: bool = False) -> None:
        changed = force or (
            self.position is None
            or position.inserted_time != self.position.inserted_time
            or position.seen.keys() != self.position.seen.keys()
        )
        self.position = position
        if changed:
            save(self.path, position, self.pending)

    async def complete(self) -> int:
        """After ``dispatch_wait`` of quiet: the markers of every chat captured since; how many."""
        if not self.pending or time.monotonic() - self.last_capture < self.dispatch_wait:
            return 0
        self.sync = self.sync or uuid.uuid4().hex  # a retry repeats the same sync
        await publish_complete(self.settings, self.pending, self.sync)
        chats, self.sync = len(self.pending), None
        self.pending = {}
        if self.position is not None:
            save(self.path, self.position, self.pending)
        self.echo(f"history sync complete: {chats} chats ready for rooms")
        return chats

    async def step(self) -> int:
        captured = await self.round()
        await self.complete()
        return captured

    async def run(self, rounds: int | None = None) -> None:
        """Poll until cancelled (or for ``rounds`` rounds, for tests)."""
        where = redact(self.location)
        start = "from the start" if self.position is None else "from its saved position"
        self.echo(f"following {where} {start} (every {self.interval:g}s; Ctrl-C stops)")
        done = 0
        try:
            while rounds is None or done < rounds:

                def warn(exc: BaseException, delay: float) -> None:
                    self.echo(f"database or broker unavailable ({exc}); retrying in {delay:.0f}s")

                await retry(self.step, f"following {where}", POLICY, on_transient=warn)
                done += 1
                await asyncio.sleep(self.interval)
        finally:
            self.close()


async def follow(
    location: str, options: dict[str, str], settings: Settings, echo: Echo = print
) -> None:
    try:
        interval = float(options.get("interval", "2"))
        wait = float(options.get("dispatch_wait", str(DISPATCH_WAIT_S)))
    except ValueError as exc:
        raise SourceError(f"options interval / dispatch_wait: {exc}") from None
    await Follower(location, options, settings, echo, interval, wait).run()
