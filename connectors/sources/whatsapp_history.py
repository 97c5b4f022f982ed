"""mautrix-whatsapp's stored history sync: ``backflow import whatsapp-history SOURCE``.

SOURCE is the bridge's database, a Postgres URL or a SQLite file, in either
schema the bridge has had (detected from the table names). Every row's
``data`` is a serialized ``HistorySyncMsg``; it is decoded with our own
minimal protobuf schema (:mod:`connectors.sources.wa_proto`) and becomes
canonical records (:mod:`connectors.sources.wa_content`) with the ids,
senders and names the bridge itself uses (:mod:`connectors.sources.wa_ids`),
so an import and the live bridge deduplicate.

Read chat by chat, oldest first, one bounded page of rows at a time. A row
that does not decode is one rejection naming the table, chat and message id;
the rest flows. ``since`` (used by ``--follow``, :mod:`wa_follow`) reads only
rows inserted at or after a position, in insertion order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources.wa_bridge_db import BRIDGEV2, BridgeDB, open_db, redact
from connectors.sources.wa_content import FUTURE_SKEW_S, NETWORK, Context, Refused, convert
from connectors.sources.wa_ids import (
    BROADCAST,
    PSA,
    STATUS_BROADCAST,
    USER,
    NotAJid,
    non_ad,
    server_of,
)
from connectors.sources.wa_names import Names
from connectors.sources.wa_proto import HistorySyncMsg
from topics.records import MIN_TS, PortalInfo

PAGE_ROWS = 500
MAX_ROW_BYTES = 4 * 1024 * 1024  # a message row; WhatsApp's own are a few KB
OVERLAP_S = 10  # --follow re-reads this much before its position (late commits)


def epoch_seconds(value: Any) -> int | None:
    """Unix seconds of a stored time: BIGINT (bridgev2), or TIMESTAMP (legacy) as read back."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        zone = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(zone.timestamp())
    if isinstance(value, str):  # SQLite keeps TIMESTAMP as text: "2024-01-02 03:04:05…"
        try:
            return int(datetime.fromisoformat(value[:19]).replace(tzinfo=UTC).timestamp())
        except ValueError:
            return None
    return None


def skipped_chat(chat: str) -> bool:
    """Chats mautrix never makes portals of: status updates, PSA, broadcast lists."""
    return chat in (STATUS_BROADCAST, PSA) or server_of(chat) == BROADCAST


@dataclass(frozen=True)
class Login:
    bridge_id: str  # "" in the legacy schema
    login: str  # bridgev2 user_login_id (own phone digits); legacy user_mxid


@dataclass
class Position:
    """Where --follow resumes: rows inserted at or after ``inserted_time`` - overlap."""

    inserted_time: int = 0
    # (bridge, login, chat, sender, message id) -> inserted_time of rows already published
    # in the overlap window, so a re-read does not publish them twice.
    seen: dict[tuple, int] = field(default_factory=dict)


class WhatsAppHistorySource(Source):
    name = "whatsapp-history"
    network = NETWORK
    description = "mautrix-whatsapp database (Postgres URL or SQLite file): stored history sync"

    accepts_url = True
    follower = "connectors.sources.wa_follow:follow"

    def __init__(
        self,
        path: Path | str,
        options: dict[str, str] | None = None,
        since: Position | None = None,
        db: BridgeDB | None = None,
        remember: bool = False,
    ) -> None:
        super().__init__(Path(str(path)), options)
        self.location = str(path)  # a URL must not go through Path ("//" collapses)
        self.since = since
        self.db = db  # an open database to use (and leave open): --follow keeps one
        # --follow: keep the keys of rows inside the overlap window (a one-shot import
        # does not, so its memory stays flat however many rows one second inserted).
        self.remember = remember or since is not None
        self.position: Position | None = None  # set when read() finishes
        self.captured = 0  # rows published by this read (follow prints it)

    def read(self) -> Iterator[SourceItem]:
        db = self.db or open_db(self.location)
        try:
            if self.since is not None and db.schema != BRIDGEV2:
                raise SourceError(
                    f"{redact(self.location)}: --follow needs the bridgev2 schema (its "
                    "inserted_time is the position); import a legacy database without --follow"
                )
            self.stats["schema_" + db.schema] = 1
            if self.since is None:
                yield from self._full(db)
            else:
                yield from self._since(db, self.since)
        finally:
            if db is not self.db:
                db.close()

    # ------------------------------------------------------------ logins and chats

    def _logins(self, db: BridgeDB) -> list[Login]:
        if db.schema == BRIDGEV2:
            rows = db.rows(
                "SELECT DISTINCT bridge_id, user_login_id FROM whatsapp_history_sync_conversation"
            )
        else:
            rows = db.rows("SELECT DISTINCT '', user_mxid FROM history_sync_conversation")
        want_bridge, want_login = self.options.get("bridge_id"), self.options.get("login")
        logins = [
            Login(b or "", lg)
            for b, lg in sorted(rows)
            if (want_bridge is None or b == want_bridge)
            and (want_login is None or lg == want_login)
        ]
        if not logins and (want_bridge or want_login):
            raise SourceError(f"{redact(self.location)}: no history sync rows for that login")
        return logins

    def _own(self, db: BridgeDB, login: Login) -> str:
        """The login's own phone JID (the sender of fromMe messages)."""
        if "own_jid" in self.options:
            try:
                return non_ad(self.options["own_jid"])
            except NotAJid as exc:
                raise SourceError(f"option own_jid: {exc}") from None
        if db.schema == BRIDGEV2 and login.login.isdigit():
            return f"{login.login}@{USER}"
        if db.has("user"):  # legacy: "user"(mxid, username = own phone digits)
            rows = db.rows('SELECT username FROM "user" WHERE mxid = ?', (login.login,))
            if rows and rows[0][0]:
                return f"{rows[0][0]}@{USER}"
        raise SourceError(f"cannot tell the own JID of login {login.login!r}: pass -o own_jid=JID")

    def _context(self, db: BridgeDB, login: Login) -> tuple[Context, Names]:
        names = Names(db, login.bridge_id)
        identity = names.identity(self._own(db, login))
        return Context(identity=identity, name_of=names.name_of, stats=self.stats), names

    def _chats(self, db: BridgeDB, login: Login) -> Iterator[tuple[str, str, Any]]:
        """(conversation key, chat JID, last message time) of each conversation, paged."""
        if db.schema == BRIDGEV2:
            sql = (
                "SELECT chat_jid, chat_jid, last_message_timestamp "
                "FROM whatsapp_history_sync_conversation "
                "WHERE bridge_id = ? AND user_login_id = ? AND chat_jid > ? "
                "ORDER BY chat_jid LIMIT ?"
            )
            scope: tuple = (login.bridge_id, login.login)
        else:
            sql = (
                "SELECT conversation_id, portal_jid, last_message_timestamp "
                "FROM history_sync_conversation "
                "WHERE user_mxid = ? AND conversation_id > ? ORDER BY conversation_id LIMIT ?"
            )
            scope = (login.login,)
        after = ""
        while rows := db.rows(sql, (*scope, after, PAGE_ROWS)):
            yield from ((str(k), str(j or ""), last) for k, j, last in rows)
            after = rows[-1][0]

    # ------------------------------------------------------------ the full read

    def _full(self, db: BridgeDB) -> Iterator[SourceItem]:
        table = "whatsapp_history_sync_message" if db.schema == BRIDGEV2 else "history_sync_message"
        start = 0
        if db.schema == BRIDGEV2:  # --follow resumes from what existed when this began
            rows = db.rows(f"SELECT max(inserted_time) FROM {table}")
            start = int(rows[0][0] or 0) if rows else 0
        seen: dict[tuple, int] = {}
        for login in self._logins(db):
            ctx, names = self._context(db, login)
            for conv, raw_chat, last in self._chats(db, login):
                try:
                    chat = non_ad(raw_chat)
                except NotAJid as exc:
                    yield Rejected(f"{table.replace('message', 'conversation')} {conv}", str(exc))
                    continue
                if skipped_chat(chat):
                    self.stats["chats_skipped"] = self.stats.get("chats_skipped", 0) + 1
                    continue
                yield self._portal(chat, names, last)
                for row in self._messages(db, login, conv):
                    sender, mid, inserted, data, size = row
                    if self.remember and isinstance(inserted, int):
                        if inserted >= start - OVERLAP_S:
                            seen[(login.bridge_id, login.login, chat, sender, mid)] = inserted
                    yield from self._row(table, chat, mid, data, size, ctx)
        self.position = Position(start, seen)

    def _messages(self, db: BridgeDB, login: Login, conv: str) -> Iterator[tuple]:
        """(sender, message id, inserted_time, data or None, size) in timestamp order."""
        if db.schema == BRIDGEV2:
            cols = "timestamp, sender_jid, message_id"
            head = (
                f"SELECT {cols}, inserted_time, CASE WHEN length(data) > ? THEN NULL ELSE data "
                "END, length(data) FROM whatsapp_history_sync_message "
                "WHERE bridge_id = ? AND user_login_id = ? AND chat_jid = ?"
            )
            scope: tuple = (MAX_ROW_BYTES, login.bridge_id, login.login, conv)
        else:
            cols = "timestamp, message_id"
            head = (
                f"SELECT {cols}, inserted_time, CASE WHEN length(data) > ? THEN NULL ELSE data "
                "END, length(data) FROM history_sync_message WHERE user_mxid = ? "
                "AND conversation_id = ?"
            )
            scope = (MAX_ROW_BYTES, login.login, conv)
        width = cols.count(",") + 1
        tail = f" ORDER BY {cols} LIMIT ?"
        rows = db.rows(head + tail, (*scope, PAGE_ROWS))
        while rows:
            for r in rows:
                sender, mid = (r[1], r[2]) if width == 3 else ("", r[1])
                yield sender, mid, r[width], r[width + 1], r[width + 2]
            last = rows[-1][:width]
            keyset = f" AND ({cols}) > ({', '.join('?' * width)})"
            rows = db.rows(head + keyset + tail, (*scope, *last, PAGE_ROWS))

    # ------------------------------------------------------------ --follow

    def _since(self, db: BridgeDB, since: Position) -> Iterator[SourceItem]:
        """Rows inserted at or after the position (minus the overlap), in insertion order."""
        cols = (
            "inserted_time, bridge_id, user_login_id, chat_jid, timestamp, sender_jid, message_id"
        )
        head = (
            f"SELECT {cols}, CASE WHEN length(data) > ? THEN NULL ELSE data END, length(data) "
            "FROM whatsapp_history_sync_message WHERE inserted_time >= ?"
        )
        tail = f" ORDER BY {cols} LIMIT ?"
        table = "whatsapp_history_sync_message"
        floor = since.inserted_time - OVERLAP_S
        wanted = set(self._logins(db))
        contexts: dict[Login, tuple[Context, Names]] = {}
        announced: set[tuple[Login, str]] = set()
        newest, seen = since.inserted_time, dict(since.seen)
        rows = db.rows(head + tail, (MAX_ROW_BYTES, floor, PAGE_ROWS))
        while rows:
            for inserted, bridge_id, login_id, raw_chat, _ts, sender, mid, data, size in rows:
                login = Login(bridge_id, login_id)
                if login not in wanted:
                    continue
                if login not in contexts:
                    contexts[login] = self._context(db, login)
                ctx, names = contexts[login]
                try:
                    chat = non_ad(raw_chat)
                except NotAJid as exc:
                    yield Rejected(f"{table} chat={raw_chat!r} id={mid!r}", str(exc))
                    continue
                key = (bridge_id, login_id, chat, sender, mid)
                newest = max(newest, int(inserted))
                known = key in seen
                seen[key] = int(inserted)
                if skipped_chat(chat) or known:
                    continue
                if (login, chat) not in announced:
                    announced.add((login, chat))
                    rows_last = db.rows(
                        "SELECT last_message_timestamp FROM whatsapp_history_sync_conversation "
                        "WHERE bridge_id = ? AND user_login_id = ? AND chat_jid = ?",
                        (bridge_id, login_id, raw_chat),
                    )
                    yield self._portal(chat, names, rows_last[0][0] if rows_last else None)
                yield from self._row(table, chat, mid, data, size, ctx)
            rows = db.rows(
                head + f" AND ({cols}) > ({', '.join('?' * 7)})" + tail,
                (MAX_ROW_BYTES, floor, *rows[-1][:7], PAGE_ROWS),
            )
        keep = newest - OVERLAP_S
        self.position = Position(newest, {k: t for k, t in seen.items() if t >= keep})

    def _portal(self, chat: str, names: Names, last: Any) -> PortalInfo:
        """The portal record; the conversation's last message time ranks it (mautrix)."""
        seconds = epoch_seconds(last)
        ms = seconds * 1000 if seconds else None
        if ms is not None and not MIN_TS <= ms <= (time.time() + FUTURE_SKEW_S) * 1000:
            ms = None  # 0, garbage or in the future: rank by the messages instead
        name = names.portal_name(chat)
        return PortalInfo(network=NETWORK, portal=chat, name=name, last_activity_ts=ms)

    # ------------------------------------------------------------ one row

    def _row(
        self, table: str, chat: str, mid: Any, data: Any, size: Any, ctx: Context
    ) -> Iterator[SourceItem]:
        where = f"{table} chat={chat} id={mid}"
        self.at = where
        self.stats["rows"] = self.stats.get("rows", 0) + 1
        key = f"{NETWORK}:{chat}"
        if data is None:
            yield Rejected(where, f"field 'data': {size} bytes, over {MAX_ROW_BYTES}", key=key)
            return
        data = bytes(data)
        try:
            wrapper = HistorySyncMsg.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            yield Rejected(where, f"field 'data': not a HistorySyncMsg ({exc})", data, key)
            return
        if not wrapper.HasField("message"):
            yield Rejected(where, "field 'data': HistorySyncMsg without a message", data, key)
            return
        try:
            records = list(convert(wrapper.message, chat, ctx))
        except Refused as exc:
            yield Rejected(where, str(exc), data, key)
            return
        except UnicodeDecodeError:
            yield Rejected(where, "field 'data': a text field is not valid UTF-8", data, key)
            return
        self.captured += 1
        yield from records
