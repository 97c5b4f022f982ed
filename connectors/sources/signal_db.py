"""Records from a replayed Signal Android database (older ``sms``/``mms`` and newer ``message``).

Column names changed over database versions (bepaald/signalbackup-tools:
setcolumnnames.cc); each query names only columns ``PRAGMA table_info``
found, the others read as NULL. Threads are read one at a time and their
messages in sent order, with reactions, attachments and mentions looked up
per message through indexes made after the replay: memory stays flat.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from connectors.source import Rejected, SourceItem
from connectors.sources import protowire as pw
from connectors.sources.signal_ids import (
    DATABASE_STYLES,
    NETWORK,
    Range,
    aci_text,
    legacy_group_portal,
    message_id,
    reaction_id,
    render,
)
from topics.records import Content, Member, NetworkMessage, PortalInfo, Sender

GROUP_UPDATE = 0x10000
OUTGOING = range(21, 27)
_NOTICES = {1: "Incoming call", 2: "Outgoing call", 3: "Missed call", 7: "Joined Signal"}
_NOTICES |= {10: "Profile changed", 11: "Missed video call", 12: "The group was upgraded"}
_MAX_MEMBERS = 1000
_CACHE = 4096


@dataclass(slots=True)
class Person:
    aci: str | None
    name: str | None
    group: str | None  # portal of a group recipient


# An attachment row (id, content type, file name, size, width, height) to its content.
Attach = Callable[[tuple[Any, ...]], Content]


class Database:
    def __init__(
        self,
        db: sqlite3.Connection,
        self_aci: str | None,
        attach: Attach,
        stats: dict[str, int],
        warn: Callable[[str], None],
    ) -> None:
        self.db, self.self_aci, self.attach, self.stats, self.warn = (
            db,
            self_aci,
            attach,
            stats,
            warn,
        )
        self.tables = {
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        self.people: dict[int, Person] = {}
        self.where = ""
        self._columns: dict[str, set[str]] = {}
        self._layout: list[tuple[str, str]] | None = None

    def columns(self, table: str) -> set[str]:
        if table not in self.tables:
            return set()
        if table not in self._columns:
            found = {row[1] for row in self.db.execute(f'PRAGMA table_info("{table}")')}
            self._columns[table] = found
        return self._columns[table]

    def pick(self, table: str, *names: str) -> str:
        """The first of ``names`` the table has, else NULL (one column expression)."""
        have = self.columns(table)
        return next((f'"{n}"' for n in names if n in have), "NULL")

    # ------------------------------------------------------------ layout
    def layout(self) -> list[tuple[str, str]]:
        """(table, SELECT of normalized columns) of every message table present."""
        if self._layout is not None:
            return self._layout
        out = []
        for table in ("message", "sms", "mms"):
            if table not in self.tables:
                continue
            if table == "message" or "message" not in self.tables:
                p = lambda *n, t=table: self.pick(t, *n)  # noqa: E731
                sent = p("date_sent", "date") if table != "sms" else p("date_sent")
                kind = p("type", "msg_box")
                sender = p("from_recipient_id", "recipient_id", "address")
                out.append(
                    (
                        table,
                        (
                            f"SELECT _id, {sent}, {kind}, {sender}, {p('body')}, {p('quote_id')}, "
                            f"{p('quote_author')}, {p('message_ranges')}, {p('remote_deleted')}, "
                            f"{p('original_message_id')}, {p('expires_in')}, {p('view_once')} "
                            f'FROM "{table}" WHERE thread_id = ? ORDER BY 2, 1'
                        ),
                    )
                )
        self._layout = out
        return out

    def prepare(self) -> None:
        """Indexes for the per-thread and per-message lookups (the backup has none of ours)."""
        wanted = [
            ("message", "thread_id"),
            ("sms", "thread_id"),
            ("mms", "thread_id"),
            ("reaction", "message_id"),
            ("attachment", "message_id"),
            ("part", "mid"),
            ("mention", "message_id"),
        ]
        for table, column in wanted:
            if column in self.columns(table):
                self.db.execute(f'CREATE INDEX IF NOT EXISTS "bf_{table}" ON "{table}"("{column}")')

    # ------------------------------------------------------------ people
    def person(self, rid: Any) -> Person | None:
        if not isinstance(rid, int):
            try:
                rid = int(rid)
            except (TypeError, ValueError):
                return None
        if rid in self.people:
            return self.people[rid]
        if "recipient" not in self.tables:
            return None
        aci = self.pick("recipient", "aci", "uuid")
        group = self.pick("recipient", "group_id")
        names = [
            self.pick("recipient", n)
            for n in (
                "nickname_joined_name",
                "system_joined_name",
                "system_display_name",
                "profile_joined_name",
                "signal_profile_name",
                "e164",
                "phone",
            )
        ]
        row = self.db.execute(
            f"SELECT {aci}, {group}, {', '.join(names)} FROM recipient WHERE _id = ?", (rid,)
        ).fetchone()
        if row is None:
            return None
        name = next((str(v) for v in row[2:] if v not in (None, "")), None)
        portal = legacy_group_portal(row[1]) if isinstance(row[1], str) else None
        if portal is not None:
            name = self.group_title(row[1]) or name
        if len(self.people) > _CACHE:
            self.people.clear()
        person = Person(aci_text(row[0]) if isinstance(row[0], str) else None, name, portal)
        self.people[rid] = person
        return person

    def group_title(self, group_id: str) -> str | None:
        if "title" not in self.columns("groups"):
            return None
        row = self.db.execute("SELECT title FROM groups WHERE group_id = ?", (group_id,)).fetchone()
        return row[0] if row and isinstance(row[0], str) and row[0] else None

    def group_members(self, group_id: str) -> list[Member]:
        ids: list[Any] = []
        if "recipient_id" in self.columns("group_membership"):
            ids = [
                r[0]
                for r in self.db.execute(
                    "SELECT recipient_id FROM group_membership WHERE group_id = ? LIMIT ?",
                    (group_id, _MAX_MEMBERS),
                )
            ]
        elif "members" in self.columns("groups"):
            row = self.db.execute(
                "SELECT members FROM groups WHERE group_id = ?", (group_id,)
            ).fetchone()
            ids = str(row[0] or "").split(",")[:_MAX_MEMBERS] if row else []
        people = [self.person(i) for i in ids]
        return [Member(id=p.aci, name=p.name) for p in people if p and p.aci]

    # ------------------------------------------------------------ threads
    def threads(self) -> Iterator[SourceItem]:
        if "thread" not in self.tables:
            return
        recipient = self.pick("thread", "recipient_id", "thread_recipient_id", "recipient_ids")
        layout = self.layout()
        for tid, rid in self.db.execute(f"SELECT _id, {recipient} FROM thread ORDER BY _id"):
            where = f"thread {tid}"
            person = self.person(rid)
            if person is None:
                yield Rejected(where, "thread recipient not in the recipient table: not imported")
                continue
            portal = person.group or person.aci
            if person.aci is not None and person.aci == self.self_aci:
                name = "Note to Self"
            else:
                name = person.name or f"Signal chat {tid}"
            if portal is None:
                self.stats["threads_without_aci"] += 1
                continue
            gid = None
            if person.group:
                row = self.db.execute("SELECT group_id FROM recipient WHERE _id = ?", (rid,))
                gid = row.fetchone()[0]
            members = self.group_members(gid) if gid else [Member(id=portal, name=person.name)]
            yield PortalInfo(NETWORK, portal, name=name, members=tuple(members))
            merged = self._merged([(t, self.db.execute(sql, (tid,))) for t, sql in layout])
            for table, row in merged:
                yield from self._message(portal, table, row, f"{where} {table} {row[0]}")

    def _merged(self, cursors: list[tuple[str, sqlite3.Cursor]]) -> Iterator[tuple[str, tuple]]:
        """sms and mms rows of one thread as one sequence in sent order (a streaming merge)."""

        def keyed(table: str, cursor: sqlite3.Cursor) -> Iterator[tuple[int, int, str, tuple]]:
            for row in cursor:
                yield (row[1] if isinstance(row[1], int) else 0, row[0], table, row)

        for _, _, table, row in heapq.merge(*(keyed(t, c) for t, c in cursors)):
            yield table, row

    # ------------------------------------------------------------ messages
    def _message(self, portal: str, table: str, row: tuple, where: str) -> Iterator[SourceItem]:
        self.where = where  # the source names records the framework refuses by it
        rowid, sent, kind, author, body, quote_id, quote_author, ranges = row[:8]
        deleted, original, expires, view_once = row[8:12]
        key = f"{NETWORK}:{portal}"
        if not isinstance(sent, int) or sent <= 0:
            yield Rejected(where, f"date_sent is {sent!r}: not imported", key=key)
            return
        if expires:
            self.stats["disappearing_skipped"] += 1
            return
        if deleted:
            self.stats["deleted_skipped"] += 1
            return
        kind = kind if isinstance(kind, int) else 0
        sender = self._sender(kind, author)
        if isinstance(sender, str):
            yield Rejected(where, sender, key=key)
            return
        if sender is None:
            self.stats["no_aci_skipped"] += 1
            return
        base = {"network": NETWORK, "portal": portal, "sender": sender, "ts": sent}
        mid = message_id(sender.id, sent)
        if kind & GROUP_UPDATE or (kind & 0x1F) not in (20, *OUTGOING):
            what = "The group was updated" if kind & GROUP_UPDATE else None
            self.stats["notices"] += 1
            notice = what or _NOTICES.get(kind & 0x1F, "Signal: update")
            yield NetworkMessage(**base, id=mid, content=Content(kind="notice", body=notice))
            return
        text, rich = self._text(table, rowid, body, ranges)
        if isinstance(original, int):
            target = self._original(table, original)
            if target is not None and text:
                self.stats["edits"] += 1
                yield NetworkMessage(
                    **base,
                    id=mid,
                    content=Content(kind="edit", target=target, body=text, html=rich),
                )
            return
        parts: list[Content] = []
        if text:
            parts.append(Content(kind="text", body=text, html=rich))
        if view_once:
            self.stats["view_once_skipped"] += 1
            parts.append(Content(kind="notice", body="View-once media (not in the backup)"))
        else:
            parts += [self.attach(a) for a in self._attachments(table, rowid)]
        if not parts:
            self.stats["skipped"] += 1
            return
        reply = None
        quoted = self.person(quote_author) if quote_author is not None else None
        if isinstance(quote_id, int) and quote_id > 0 and quoted and quoted.aci:
            reply = message_id(quoted.aci, quote_id)
        self.stats["messages"] += 1
        for part, content in enumerate(parts):
            yield NetworkMessage(**base, id=mid, part=part, content=content, reply_to=reply)
        yield from self._reactions(table, rowid, base, mid)

    def _sender(self, kind: int, author: Any) -> Sender | str | None:
        if (kind & 0x1F) in OUTGOING:
            if self.self_aci is None:
                self.warn("own messages were not imported: pass -o self_aci=UUID (your ACI)")
                return "own message: the account's ACI is needed (-o self_aci=UUID)"
            return Sender(id=self.self_aci)
        person = self.person(author)
        if person is None or person.aci is None:
            return None  # mautrix-signal skips authors without an ACI
        return Sender(id=person.aci, name=person.name)

    def _original(self, table: str, rowid: int) -> str | None:
        sql = next(s for t, s in self.layout() if t == table).replace("thread_id = ?", "_id = ?")
        row = self.db.execute(sql, (rowid,)).fetchone()
        if row is None or not isinstance(row[1], int):
            return None
        sender = self._sender(row[2] if isinstance(row[2], int) else 0, row[3])
        return message_id(sender.id, row[1]) if isinstance(sender, Sender) else None

    def _text(self, table: str, rowid: int, body: Any, blob: Any) -> tuple[str, str | None]:
        text = body if isinstance(body, str) else ""
        ranges: list[Range] = []
        if isinstance(blob, bytes):
            try:
                for raw in pw.message(blob).get(1, ()):
                    r = pw.message(raw) if isinstance(raw, bytes) else {}
                    style = pw.first(r, 4)
                    mention = aci_text(pw.text(pw.first(r, 3)))
                    ranges.append(
                        Range(
                            int(pw.first(r, 1, 0)),
                            int(pw.first(r, 2, 0)),
                            style=DATABASE_STYLES.get(style) if isinstance(style, int) else None,
                            mention=self._mention_name(mention) if mention else None,
                        )
                    )
            except (pw.WireError, TypeError):
                self.stats["ranges_unreadable"] += 1
        if {"range_start", "range_length"} <= self.columns("mention") and table != "sms":
            for rid, start, length in self.db.execute(
                "SELECT recipient_id, range_start, range_length FROM mention WHERE message_id = ?",
                (rowid,),
            ):
                person = self.person(rid)
                if isinstance(start, int) and isinstance(length, int):
                    name = (person.name if person else None) or "someone"
                    ranges.append(Range(start, length, mention=name))
        return render(text, ranges)

    def _mention_name(self, aci: str) -> str:
        column = self.pick("recipient", "aci", "uuid")
        row = self.db.execute(f"SELECT _id FROM recipient WHERE {column} = ?", (aci,)).fetchone()
        person = self.person(row[0]) if row else None
        return (person.name if person else None) or aci[:8]

    def _attachments(self, table: str, rowid: int) -> list[tuple[Any, ...]]:
        if table == "sms":
            return []
        name = "attachment" if "attachment" in self.tables else "part"
        link = self.pick(name, "message_id", "mid")
        if link == "NULL":
            return []
        cols = ", ".join(
            self.pick(name, *n)
            for n in (
                ("content_type", "ct"),
                ("file_name",),
                ("data_size",),
                ("width",),
                ("height",),
            )
        )
        return list(
            self.db.execute(
                f'SELECT _id, {cols} FROM "{name}" WHERE {link} = ? ORDER BY _id', (rowid,)
            )
        )

    def _reactions(self, table: str, rowid: int, base: dict, mid: str) -> Iterator[SourceItem]:
        have = self.columns("reaction")
        if not {"message_id", "author_id", "emoji"} <= have:
            return
        sql = "SELECT author_id, emoji, " + ("date_sent" if "date_sent" in have else "0")
        sql += " FROM reaction WHERE message_id = ?"
        args: tuple = (rowid,)
        if "is_mms" in have:
            sql, args = sql + " AND is_mms = ?", (rowid, int(table == "mms"))
        for author, emoji, when in self.db.execute(sql, args).fetchall():
            person = self.person(author)
            aci = person.aci if person else None
            if not isinstance(emoji, str) or not emoji or aci is None:
                self.stats["reactions_skipped"] += 1
                continue
            self.stats["reactions"] += 1
            yield NetworkMessage(
                network=NETWORK,
                portal=base["portal"],
                id=reaction_id(mid, aci),
                sender=Sender(id=aci, name=person.name),
                ts=max(when if isinstance(when, int) else 0, base["ts"]),
                content=Content(kind="reaction", target=mid, key=emoji),
            )
