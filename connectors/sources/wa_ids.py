"""WhatsApp JIDs and the ids mautrix-whatsapp makes of them (pkg/waid, whatsmeow).

Records from this import and from a live bridge deduplicate only if both
spell ids the same way: portal = chat JID without device, message =
``{chat}:{sender}:{key id}``, ghost = phone digits, ``lid-<n>`` or
``bot-<n>``. A phone-number sender with a known LID is written as the LID
(in ``@lid`` chats for message ids, always for ghosts), as the bridge does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

USER = "s.whatsapp.net"
LID = "lid"
GROUP = "g.us"
BOT = "bot"
NEWSLETTER = "newsletter"
BROADCAST = "broadcast"
SERVERS = frozenset({USER, LID, GROUP, BOT, NEWSLETTER, BROADCAST, "c.us", "msgr", "interop"})
# Chats with one counterpart: the sender of a message that is not ours is the chat.
DIRECT_SERVERS = frozenset({USER, LID, NEWSLETTER, BOT})
# Never portals (mautrix skips them when ranking and bridging history).
STATUS_BROADCAST = "status@broadcast"
PSA = "0@s.whatsapp.net"

_JID = re.compile(
    r"^(?P<user>[0-9A-Za-z_-]{0,64})(?:[.:][0-9]{1,5}){0,2}@(?P<server>[a-z.]{1,16})$"
)


class NotAJid(ValueError):
    """A chat or sender that is not a WhatsApp JID."""


def non_ad(jid: str) -> str:
    """``user@server`` without agent and device (``123:4@s.whatsapp.net`` -> ``123@…``)."""
    match = _JID.match(jid or "")
    if match is None or match["server"] not in SERVERS or not match["user"]:
        raise NotAJid(f"{jid[:80]!r} is not a WhatsApp JID")
    return f"{match['user']}@{match['server']}"


def user_of(jid: str) -> str:
    return jid.partition("@")[0]


def server_of(jid: str) -> str:
    return jid.partition("@")[2]


def ghost_id(jid: str) -> str:
    """The bridge's ghost id of a user JID (pkg/waid MakeUserID)."""
    user, server = user_of(jid), server_of(jid)
    if server == LID:
        return f"lid-{user}"
    if server == BOT:
        return f"bot-{user}"
    return user


def phone_name(jid: str) -> str | None:
    """``+<digits>`` for a phone-number JID: the bridge's last-resort name."""
    return f"+{user_of(jid)}" if server_of(jid) == USER and user_of(jid).isdigit() else None


@dataclass
class Identity:
    """Who "me" is for one login, and how phone numbers map to LIDs.

    ``lid_of`` answers for a bare phone number (``whatsmeow_lid_map.pn``) with
    the bare LID, or None; callers cache.
    """

    own: str  # own phone JID, ``<digits>@s.whatsapp.net``
    lid_of: Callable[[str], str | None]
    own_lid: str | None = None

    def to_lid(self, jid: str) -> str:
        """The LID JID of a phone-number JID when one is known, else the JID."""
        if server_of(jid) != USER:
            return jid
        if jid == self.own and self.own_lid:
            return self.own_lid
        lid = self.lid_of(user_of(jid))
        return f"{lid}@{LID}" if lid else jid

    def sender_in(self, chat: str, jid: str) -> str:
        """How a sender is written inside ``chat``'s message ids."""
        return self.to_lid(jid) if server_of(chat) == LID else jid

    def message_id(self, chat: str, sender: str, key_id: str) -> str:
        return f"{chat}:{self.sender_in(chat, sender)}:{key_id}"

    def ghost(self, jid: str) -> str:
        """Ghost id of a sender: senders prefer the LID."""
        return ghost_id(self.to_lid(jid))


def chat_of(raw: str, identity: Identity, reroute: bool) -> str:
    """The portal id of a chat JID: no device; a phone DM goes to its LID when ``reroute``."""
    chat = non_ad(raw)
    return identity.to_lid(chat) if reroute else chat


def key_sender(
    chat: str,
    identity: Identity,
    from_me: bool,
    participant: str,
    self_author: str = "",
) -> str:
    """The sender of a message or of the message a key points at (whatsmeow ParseWebMessage).

    Raises NotAJid when a group message names no usable participant.
    """
    if from_me:
        return non_ad(self_author) if self_author else identity.own
    if server_of(chat) in DIRECT_SERVERS:
        return chat
    if participant:
        return non_ad(participant)
    raise NotAJid(f"a message in group {chat} names no participant")
