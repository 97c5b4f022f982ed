"""Names and LIDs from a mautrix-whatsapp database, looked up as needed, cached bounded.

Display names, best first: the bridge's own ghost name (what Matrix already
shows), then whatsmeow's contact (address-book full name, push name,
business name, first name), then the push name the message carries, then
``+<phone>``. Portal names: the bridge's ``portal.name`` for groups, the
other side's name for DMs, else the JID. Tables the database lacks are
simply not asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from connectors.sources.wa_bridge_db import BRIDGEV2, BridgeDB
from connectors.sources.wa_ids import GROUP, LID, USER, Identity, ghost_id, phone_name, server_of
from connectors.sources.wa_ids import user_of as user_part

CACHE_ENTRIES = 20_000  # per cache; cleared when full (memory bounded, hits stay cheap)


class Bounded:
    """A dict that forgets everything when it reaches ``limit`` entries."""

    def __init__(self, limit: int = CACHE_ENTRIES) -> None:
        self.limit, self.data = limit, {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self.data:
            return self.data[key]
        if len(self.data) >= self.limit:
            self.data.clear()
        value = self.data[key] = make()
        return value


class Names:
    """Lookups for one bridge (bridge id; the legacy schema has none)."""

    def __init__(self, db: BridgeDB, bridge_id: str = "") -> None:
        self.db, self.bridge_id = db, bridge_id
        self._lid, self._pn, self._names, self._portals = Bounded(), Bounded(), Bounded(), Bounded()
        # Filled from a history-sync blob (pushnames, conversation names, LID map).
        self.extra: dict[str, str] = {}
        self.extra_lid: dict[str, str] = {}  # bare phone -> bare LID
        self.extra_pn: dict[str, str] = {}

    def _one(self, sql: str, params: tuple) -> Any:
        rows = self.db.rows(sql + " LIMIT 1", params)
        return rows[0][0] if rows and rows[0][0] not in (None, "") else None

    def lid_of(self, pn: str) -> str | None:
        if pn in self.extra_lid or not self.db.has("whatsmeow_lid_map"):
            return self.extra_lid.get(pn)
        return self._lid.get(
            pn, lambda: self._one("SELECT lid FROM whatsmeow_lid_map WHERE pn = ?", (pn,))
        )

    def pn_of(self, lid: str) -> str | None:
        if lid in self.extra_pn or not self.db.has("whatsmeow_lid_map"):
            return self.extra_pn.get(lid)
        return self._pn.get(
            lid, lambda: self._one("SELECT pn FROM whatsmeow_lid_map WHERE lid = ?", (lid,))
        )

    def identity(self, own: str, own_lid: str | None = None) -> Identity:
        lid = own_lid or self.lid_of(user_part(own))
        return Identity(own=own, lid_of=self.lid_of, own_lid=f"{lid}@{LID}" if lid else None)

    def name_of(self, jid: str, push_name: str = "") -> str | None:
        """The display name of a user JID (``push_name`` from the message, if any)."""
        known = self._names.get(jid, lambda: self._lookup(jid))
        return known or (push_name[:255] if push_name else None) or self._phone(jid)

    def _phone(self, jid: str) -> str | None:
        if server_of(jid) == LID:
            pn = self.pn_of(user_part(jid))
            return f"+{pn}" if pn else None
        return phone_name(jid)

    def _lookup(self, jid: str) -> str | None:
        candidates = [jid]
        server = server_of(jid)
        if server == LID and (pn := self.pn_of(user_part(jid))):
            candidates.append(f"{pn}@{USER}")
        elif server == USER and (lid := self.lid_of(user_part(jid))):
            candidates.insert(0, f"{lid}@{LID}")
        for candidate in candidates:
            name = self.extra.get(candidate) or self._ghost_name(candidate)
            if name:
                return name[:255]
        for candidate in candidates:
            name = self._contact_name(candidate)
            if name:
                return name[:255]
        return None

    def _ghost_name(self, jid: str) -> str | None:
        db = self.db
        if db.schema == BRIDGEV2 and db.has("ghost"):
            sql = "SELECT name FROM ghost WHERE bridge_id = ? AND id = ?"
            return self._one(sql, (self.bridge_id, ghost_id(jid)))
        if db.has("puppet") and server_of(jid) == USER:
            return self._one("SELECT displayname FROM puppet WHERE username = ?", (user_part(jid),))
        return None

    def _contact_name(self, jid: str) -> str | None:
        if not self.db.has("whatsmeow_contacts"):
            return None
        rows = self.db.rows(
            "SELECT full_name, push_name, business_name, first_name FROM whatsmeow_contacts "
            "WHERE their_jid = ? LIMIT 1",
            (jid,),
        )
        return next((v for v in (rows[0] if rows else ()) if v), None)

    def portal_name(self, chat: str) -> str:
        """What the room is called: the bridge's portal name, the DM partner, or the JID."""
        return self._portals.get(chat, lambda: self._portal_name(chat))

    def _portal_name(self, chat: str) -> str:
        db = self.db
        name = self.extra.get(chat)
        if not name and db.schema == BRIDGEV2 and db.has("portal"):
            sql = "SELECT name FROM portal WHERE bridge_id = ? AND id = ? AND name <> ''"
            name = self._one(sql, (self.bridge_id, chat))
        elif not name and db.has("portal") and db.schema != BRIDGEV2:
            name = self._one("SELECT name FROM portal WHERE jid = ? AND name <> ''", (chat,))
        if not name and server_of(chat) != GROUP:
            name = self.name_of(chat)
        return (name or chat)[:255]
