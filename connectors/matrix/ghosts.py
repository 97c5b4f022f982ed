"""Ghost and alias ids: network ids -> Matrix localparts, reversibly.

Scheme (documented in docs/sink.md):

    ghost localpart = {user_prefix}{net}_{escape(sender id)}
    alias localpart = {alias_prefix}{net}_{escape(portal id)}

or, for a network with a template (``sink.ghost_templates`` /
``sink.alias_templates``, mautrix's ``username_template`` style such as
``whatsapp_{id}``), the template's prefix + ``escape(id)``, so backflow's
ghosts can be the bridge's own.

``escape`` is the spec's "mapping from other character sets" (Matrix spec,
appendices, "Mapping from other character sets"): UTF-8 encode, then

* ``a-z 0-9 . - /`` stay as they are,
* ``A-Z`` become ``_`` + the lowercase letter,
* ``_`` becomes ``__``,
* every other byte (including ``=``) becomes ``=`` + two lowercase hex digits.

``net`` is the network name (already ``[a-z0-9_.-]``) with ``_`` written as
``=5f``, so the first single ``_`` after the prefix always separates network
and id and the mapping can be reversed (``parse_ghost``).

Matrix ids are at most 255 characters. An escaped id that would not fit is
cut and suffixed with ``=~`` + 16 hex digits of its SHA-256: still unique and
stable, but no longer reversible (``parse_ghost`` returns None for the id).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re

from connectors.matrix.client import MatrixClient, MatrixRequestError
from connectors.matrix.fetch import MediaError
from connectors.matrix.media import media_uri
from connectors.matrix.store import SinkStore

log = logging.getLogger("backflow.sink")

MAX_MXID = 255
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789.-/")
_HASH_MARK = "=~"


def escape(value: str) -> str:
    """Escape any string into the Matrix user-id alphabet (reversible)."""
    out: list[str] = []
    for byte in value.encode("utf-8"):
        if byte in _PLAIN:
            out.append(chr(byte))
        elif 65 <= byte <= 90:  # A-Z
            out.append("_" + chr(byte + 32))
        elif byte == 95:  # _
            out.append("__")
        else:
            out.append(f"={byte:02x}")
    return "".join(out)


def unescape(value: str) -> str:
    """Inverse of ``escape``; raises ValueError on text ``escape`` cannot produce."""
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "_":
            nxt = value[i + 1 : i + 2]
            if nxt == "_":
                out.append(95)
            elif nxt and "a" <= nxt <= "z":
                out.append(ord(nxt) - 32)
            else:
                raise ValueError(f"bad escape at {i} in {value!r}")
            i += 2
        elif ch == "=":
            try:
                out.append(int(value[i + 1 : i + 3], 16))
            except ValueError:
                raise ValueError(f"bad escape at {i} in {value!r}") from None
            i += 3
        elif ord(ch) < 128 and ord(ch) in _PLAIN:
            out.append(ord(ch))
            i += 1
        else:
            raise ValueError(f"character {ch!r} cannot occur in an escaped id")
    return out.decode("utf-8")


def _network(network: str) -> str:
    return escape(network).replace("__", "=5f")


def _fit(prefix: str, escaped: str, room: int) -> str:
    """Cut ``escaped`` to ``room`` characters, keeping it unique with a hash suffix."""
    if len(prefix) + len(escaped) <= room:
        return prefix + escaped
    digest = hashlib.sha256(escaped.encode()).hexdigest()[:16]
    keep = max(0, room - len(prefix) - len(_HASH_MARK) - len(digest))
    cut = escaped[:keep]
    # Never cut an escape sequence in half.
    while cut and (cut[-1] in "=_" or (len(cut) > 1 and cut[-2] == "=")):
        cut = cut[:-1]
    return f"{prefix}{cut}{_HASH_MARK}{digest}"


# Per-network naming templates (sink.ghost_templates / sink.alias_templates):
# {network: literal prefix}, the id goes where the template's "{id}" ends it.
Templates = dict[str, str]
_TEMPLATE = re.compile(r"^(?P<net>[a-z0-9][a-z0-9_.-]*)=(?P<prefix>[a-z0-9._=/-]*)\{id\}$")


def parse_templates(text: str, setting: str, namespace_prefix: str) -> Templates:
    """``"whatsapp=whatsapp_{id},signal=signal_{id}"`` -> {network: prefix}.

    mautrix's ``username_template`` style. The literal part must be in the
    localpart alphabet and inside the registration's namespace (start with
    ``namespace_prefix``), or the homeserver would refuse every ghost.
    """
    out: Templates = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = _TEMPLATE.match(item)
        if match is None:
            raise ValueError(
                f"{setting}: {item!r} is not NETWORK=PREFIX{{id}} (lowercase letters, digits, "
                "._=/- before a final {id})"
            )
        if not match["prefix"].startswith(namespace_prefix):
            raise ValueError(
                f"{setting}: {item!r} is outside the registration's namespace "
                f"(localparts must start with {namespace_prefix!r})"
            )
        out[match["net"]] = match["prefix"]
    return out


def ghost_localpart(
    user_prefix: str,
    network: str,
    sender_id: str,
    server_name: str,
    templates: Templates | None = None,
) -> str:
    """The localpart of the ghost for ``sender_id`` on ``network`` (a template's if set)."""
    return _localpart(user_prefix, network, sender_id, server_name, templates)


def ghost_user_id(
    user_prefix: str,
    network: str,
    sender_id: str,
    server_name: str,
    templates: Templates | None = None,
) -> str:
    local = ghost_localpart(user_prefix, network, sender_id, server_name, templates)
    return f"@{local}:{server_name}"


def alias_localpart(
    alias_prefix: str,
    network: str,
    portal_id: str,
    server_name: str,
    templates: Templates | None = None,
) -> str:
    """The localpart of the portal room alias (the room's idempotency key)."""
    return _localpart(alias_prefix, network, portal_id, server_name, templates)


def _localpart(
    prefix: str, network: str, ident: str, server_name: str, templates: Templates | None
) -> str:
    """``{prefix}{net}_{escape(id)}``, or the network's template prefix + ``escape(id)``,
    fitted so the whole id (sigil, ``:`` and server name included) stays within the limit."""
    room = MAX_MXID - len(server_name) - 2  # the sigil and ":"
    start = (templates or {}).get(network)
    if start is None:
        start = f"{prefix}{_network(network)}_"
    return _fit(start, escape(ident), room)


def room_alias(
    alias_prefix: str,
    network: str,
    portal_id: str,
    server_name: str,
    templates: Templates | None = None,
) -> str:
    local = alias_localpart(alias_prefix, network, portal_id, server_name, templates)
    return f"#{local}:{server_name}"


def parse_ghost(user_prefix: str, user_id: str) -> tuple[str, str | None] | None:
    """(network, sender id) of a ghost user id; sender id None when hashed; None if not ours."""
    localpart = user_id.removeprefix("@").split(":", 1)[0]
    if not localpart.startswith(user_prefix):
        return None
    rest = localpart[len(user_prefix) :]
    net, sep, escaped = rest.partition("_")
    if not sep:
        return None
    try:
        network = unescape(net.replace("=5f", "__"))
        if _HASH_MARK in escaped:
            return network, None
        return network, unescape(escaped)
    except ValueError:
        return None


# ---------------------------------------------------------------- registry


class Ghosts:
    """Registers ghosts once and keeps their profiles as the network last said.

    The store remembers what we set (so a restart does not re-set every
    profile); an in-process cache avoids the database on the hot path.
    """

    def __init__(
        self,
        client: MatrixClient,
        store: SinkStore,
        user_prefix: str,
        templates: Templates | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.user_prefix = user_prefix
        self.templates = templates or {}
        self.server = client.server_name
        self._cache: dict[str, tuple[str | None, str | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(
        self, network: str, sender_id: str, name: str | None, avatar: str | None
    ) -> str:
        """Register the ghost once and keep its profile up to date; returns its user id."""
        local = ghost_localpart(self.user_prefix, network, sender_id, self.server, self.templates)
        user_id = f"@{local}:{self.server}"
        cached = self._cache.get(user_id)
        if (
            cached is not None
            and (name is None or cached[0] == name)
            and (avatar is None or cached[1] == avatar)
        ):
            return user_id
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:  # two rooms meeting the same new ghost register it once
            cached = self._cache.get(user_id)
            if cached is None:
                row = await self.store.ghost(user_id)
                if row is not None:
                    cached = (row["displayname"], row["avatar_source"])
                    await self.client.registered(user_id)
            if cached is None:
                await self.client.register(local)
                cached = (None, None)
            new_name = name if name is not None else cached[0]
            new_avatar = avatar if avatar is not None else cached[1]
            if new_name is not None and new_name != cached[0]:
                await self.client.set_displayname(user_id, new_name)
            if new_avatar is not None and new_avatar != cached[1]:
                try:
                    mxc = await media_uri(self.client, new_avatar)
                    await self.client.set_avatar(user_id, mxc)
                except (MediaError, MatrixRequestError) as exc:
                    log.warning("avatar for %s not set: %s", user_id, exc)
            if (new_name, new_avatar) != cached or await self.store.ghost(user_id) is None:
                await self.store.save_ghost(user_id, new_name, new_avatar)
            self._cache[user_id] = (new_name, new_avatar)
        return user_id
