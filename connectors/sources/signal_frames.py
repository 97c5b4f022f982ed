"""Signal backup frames (libsignal's backup.proto, as dicts) to backflow records.

The plaintext export writes each Frame as protobuf JSON (uint64 as strings,
bytes as base64, enums as names or numbers); the mapper reads them leniently.
Frames come in order: recipients and chats before the chat items that name
them, chat items in receive order. Recipients and chats are kept (one small
entry each: memory grows with contacts, not messages); chat items stream.

Mapping (docs/connectors.md, ``signal-export``):
- portal: a DM is the contact's ACI, a group the base64 of its identifier,
  Note to Self the own ACI; release notes and story lists are skipped.
- message id ``<author ACI>|<dateSent>``; an edited item keeps the id of its
  oldest revision, later revisions and the current text follow as edits.
- quotes -> ``reply_to``; reactions after their message; remote deletes,
  disappearing and view-once items are skipped (counted); system items are
  notices from the Signal system sender.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from connectors.source import Rejected, SourceItem
from connectors.sources.shape import mismatch
from connectors.sources.signal_ids import (
    EXPORT_STYLES,
    NETWORK,
    SYSTEM_SENDER,
    Range,
    aci_text,
    group_identifier,
    group_portal,
    message_id,
    reaction_id,
    render,
)
from topics.records import Content, Member, NetworkMessage, PortalInfo, Sender

_INT = (int, str)
_TEXT = {"body": str, "bodyRanges": [{"start": _INT, "length": _INT, "style": _INT}]}
_POINTER = {"contentType": str, "fileName": str, "width": _INT, "height": _INT, "caption": str}
_REACTION = {"emoji": str, "authorId": _INT, "sentTimestamp": _INT}
ITEM_SHAPE = {
    "chatId": _INT,
    "authorId": _INT,
    "dateSent": _INT,
    "expiresInMs": _INT,
    "revisions": [dict],
    "standardMessage": {
        "text": _TEXT,
        "quote": {"targetSentTimestamp": _INT, "authorId": _INT},
        "attachments": [{"pointer": _POINTER}],
        "reactions": [_REACTION],
    },
    "stickerMessage": {"sticker": {"emoji": str, "data": _POINTER}, "reactions": [_REACTION]},
}

# A pointer to the attachment's content: media, or a notice saying why not.
Attach = Callable[[dict[str, Any], str], Content]


def as_int(value: Any) -> int | None:
    """A protobuf JSON integer (a number or a decimal string); None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def as_bytes(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_")
    except (binascii.Error, ValueError):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            return None


@dataclass(slots=True)
class Recipient:
    kind: str  # contact, group, self, releaseNotes, distributionList, callLink
    aci: str | None = None
    name: str | None = None
    portal: str | None = None
    members: tuple[str, ...] = ()


@dataclass(slots=True)
class Chat:
    portal: str | None
    name: str
    why_not: str | None = None  # set when the chat has no portal


@dataclass
class FrameMapper:
    self_aci: str | None
    attach: Attach
    stats: dict[str, int]
    warn: Callable[[str], None]
    recipients: dict[str, Recipient] = field(default_factory=dict)
    chats: dict[str, Chat] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # ACI -> display name

    # ------------------------------------------------------------ frames
    def frame(self, frame: dict[str, Any], where: str) -> Iterator[SourceItem]:
        if "recipient" in frame:
            yield from self._recipient(frame["recipient"], where)
        elif "chat" in frame:
            yield from self._chat(frame["chat"], where)
        elif "chatItem" in frame:
            yield from self._item(frame["chatItem"], where)
        elif frame.keys() & {"account", "stickerPack", "adHocCall", "notificationProfile"} or (
            "chatFolder" in frame
        ):
            self.stats["frames_skipped"] += 1
        else:
            self.stats["unknown_frames"] += 1

    def _recipient(self, rec: Any, where: str) -> Iterator[SourceItem]:
        if not isinstance(rec, dict) or as_int(rec.get("id")) is None:
            yield Rejected(where, "recipient without an integer id", str(rec)[:2000])
            return
        rid = str(as_int(rec["id"]))
        if isinstance(rec.get("contact"), dict):
            contact = rec["contact"]
            aci = aci_text(as_bytes(contact.get("aci")))
            name = _contact_name(contact)
            self.recipients[rid] = Recipient("contact", aci=aci, name=name, portal=aci)
            if aci and name:
                self.names[aci] = name
        elif isinstance(rec.get("group"), dict):
            group = rec["group"]
            key = as_bytes(group.get("masterKey"))
            if key is None or len(key) != 32:
                yield Rejected(where, "field 'group.masterKey': expected 32 bytes of base64")
                self.recipients[rid] = Recipient("group")
                return
            snapshot = group.get("snapshot") if isinstance(group.get("snapshot"), dict) else {}
            title = snapshot.get("title")
            title = title.get("title") if isinstance(title, dict) else None
            members = tuple(
                aci
                for m in snapshot.get("members") or ()
                if isinstance(m, dict) and (aci := aci_text(as_bytes(m.get("userId"))))
            )
            portal = group_portal(group_identifier(key))
            self.recipients[rid] = Recipient(
                "group",
                name=title if isinstance(title, str) else None,
                portal=portal,
                members=members,
            )
        elif "self" in rec:
            self.recipients[rid] = Recipient("self", aci=self.self_aci, portal=self.self_aci)
        else:
            kind = next((k for k in rec if k != "id"), "unknown")
            self.recipients[rid] = Recipient(kind)

    def _chat(self, chat: Any, where: str) -> Iterator[SourceItem]:
        if not isinstance(chat, dict) or as_int(chat.get("id")) is None:
            yield Rejected(where, "chat without an integer id", str(chat)[:2000])
            return
        cid = str(as_int(chat["id"]))
        rec = self.recipients.get(str(as_int(chat.get("recipientId"))))
        if rec is None:
            self.chats[cid] = Chat(None, "", why_not="its recipientId names no recipient")
            yield Rejected(where, f"chat {cid}: recipientId names no recipient before it")
            return
        if rec.kind in ("releaseNotes", "distributionList", "callLink"):
            self.chats[cid] = Chat(None, "", why_not="skip")
            self.stats["chats_skipped"] += 1
            return
        if rec.portal is None:
            why = (
                "own messages need the account's ACI: pass -o self_aci=UUID"
                if rec.kind == "self"
                else "the contact has no ACI (mautrix-signal cannot bridge it)"
            )
            self.chats[cid] = Chat(None, "", why_not=why)
            yield Rejected(where, f"chat {cid}: not imported: {why}")
            return
        name = rec.name or ("Note to Self" if rec.kind == "self" else f"Signal chat {cid}")
        self.chats[cid] = Chat(rec.portal, name)
        members = tuple(Member(id=a, name=self.names.get(a)) for a in rec.members)
        if rec.kind == "contact":
            members = (Member(id=rec.portal, name=rec.name),)
        yield PortalInfo(NETWORK, rec.portal, name=name, members=members)

    # ------------------------------------------------------------ chat items
    def _item(self, item: Any, where: str) -> Iterator[SourceItem]:
        if not isinstance(item, dict):
            yield Rejected(where, "chatItem is not an object", str(item)[:2000])
            return
        reason = mismatch(item, ITEM_SHAPE, "chatItem")
        if reason is not None:
            yield Rejected(where, reason, _excerpt(item))
            return
        chat = self.chats.get(str(as_int(item.get("chatId"))))
        if chat is None:
            yield Rejected(where, "field 'chatItem.chatId': names no chat frame before it")
            return
        if chat.portal is None:
            self.stats["skipped"] += 1  # the chat's one rejection said why
            return
        if as_int(item.get("expiresInMs")):
            self.stats["disappearing_skipped"] += 1
            return
        sender = self._sender(item.get("authorId"))
        if isinstance(sender, str):
            yield Rejected(where, sender, key=f"{NETWORK}:{chat.portal}")
            return
        if sender is None:
            self.stats["no_aci_skipped"] += 1
            return
        key = f"{NETWORK}:{chat.portal}"
        revisions = [r for r in item.get("revisions") or () if isinstance(r, dict)]
        first = revisions[0] if revisions else item
        sent = as_int(first.get("dateSent")) or 0
        if sent <= 0:
            yield Rejected(
                where, "field 'chatItem.dateSent': timestamp 0: not imported", _excerpt(item), key
            )
            return
        mid = message_id(sender.id, sent)
        base = {"network": NETWORK, "portal": chat.portal, "id": mid, "sender": sender, "ts": sent}
        contents = self._contents(first, where)
        if contents is None:
            return
        if not contents:
            self.stats["skipped"] += 1
            return
        reply = self._reply(first)
        self.stats["messages"] += 1
        for part, content in enumerate(contents):
            yield NetworkMessage(**base, part=part, content=content, reply_to=reply)
        for later in [*revisions[1:], item] if revisions else ():
            yield from self._edit(later, base, mid)
        current = item.get("standardMessage") or item.get("stickerMessage") or {}
        for reaction in current.get("reactions") or () if isinstance(current, dict) else ():
            yield from self._reaction(reaction, base, mid)

    def _sender(self, author: Any) -> Sender | str | None:
        rec = self.recipients.get(str(as_int(author)))
        if rec is None:
            return "field 'chatItem.authorId': names no recipient"
        if rec.kind == "self":
            if self.self_aci is None:
                self.warn("own messages were not imported: pass -o self_aci=UUID (your ACI)")
                return "own message: the account's ACI is needed (-o self_aci=UUID)"
            return Sender(id=self.self_aci, name=rec.name)
        if rec.kind == "releaseNotes":
            return SYSTEM_SENDER
        if rec.aci is None:
            return None
        return Sender(id=rec.aci, name=rec.name)

    def _reply(self, item: dict[str, Any]) -> str | None:
        std = item.get("standardMessage")
        quote = std.get("quote") if isinstance(std, dict) else None
        if not isinstance(quote, dict):
            return None
        target = self._sender(quote.get("authorId"))
        when = as_int(quote.get("targetSentTimestamp"))
        if isinstance(target, Sender) and when:
            return message_id(target.id, when)
        return None

    def _edit(self, later: dict[str, Any], base: dict[str, Any], mid: str) -> Iterator[SourceItem]:
        sent = as_int(later.get("dateSent")) or 0
        std = later.get("standardMessage")
        text = std.get("text") if isinstance(std, dict) else None
        if sent <= 0 or not isinstance(text, dict):
            return
        body, rich = self._text(text)
        if not body:
            return
        self.stats["edits"] += 1
        yield NetworkMessage(
            **{**base, "id": message_id(base["sender"].id, sent), "ts": max(sent, base["ts"])},
            content=Content(kind="edit", target=mid, body=body, html=rich),
        )

    def _reaction(self, reaction: Any, base: dict[str, Any], mid: str) -> Iterator[SourceItem]:
        if not isinstance(reaction, dict) or not isinstance(reaction.get("emoji"), str):
            return
        who = self._sender(reaction.get("authorId"))
        if not isinstance(who, Sender):
            self.stats["reactions_skipped"] += 1
            return
        when = as_int(reaction.get("sentTimestamp")) or 0
        self.stats["reactions"] += 1
        yield NetworkMessage(
            network=NETWORK,
            portal=base["portal"],
            id=reaction_id(mid, who.id),
            sender=who,
            ts=max(when, base["ts"]),
            content=Content(kind="reaction", target=mid, key=reaction["emoji"]),
        )

    def _text(self, text: dict[str, Any]) -> tuple[str, str | None]:
        body = text.get("body") if isinstance(text.get("body"), str) else ""
        ranges = []
        for r in text.get("bodyRanges") or ():
            start, length = as_int(r.get("start")) or 0, as_int(r.get("length")) or 0
            style = r.get("style")
            style = EXPORT_STYLES.get(style) if isinstance(style, int) else style
            aci = aci_text(as_bytes(r.get("mentionAci")))
            mention = (self.names.get(aci) or aci[:8]) if aci else None
            ranges.append(Range(start, length, style=style, mention=mention))
        return render(body, ranges)

    def _contents(self, item: dict[str, Any], where: str) -> list[Content] | None:
        """What the item shows, part by part; None when it is skipped on purpose."""
        std = item.get("standardMessage")
        if isinstance(std, dict):
            parts: list[Content] = []
            text = std.get("text")
            if isinstance(text, dict):
                body, rich = self._text(text)
                if body:
                    parts.append(Content(kind="text", body=body, html=rich))
            for attachment in std.get("attachments") or ():
                pointer = attachment.get("pointer") if isinstance(attachment, dict) else None
                if isinstance(pointer, dict):
                    parts.append(self.attach(pointer, where))
            return parts
        if isinstance(item.get("stickerMessage"), dict):
            sticker = item["stickerMessage"].get("sticker") or {}
            data = sticker.get("data")
            emoji = sticker.get("emoji") or ""
            if isinstance(data, dict):
                content = self.attach({"fileName": f"sticker {emoji}".strip(), **data}, where)
                if content.kind == "media":
                    return [content]
            return [Content(kind="notice", body=f"Sticker {emoji}".strip())]
        for skipped in ("remoteDeletedMessage", "adminDeletedMessage"):
            if skipped in item:
                self.stats["deleted_skipped"] += 1
                return None
        if "viewOnceMessage" in item:
            self.stats["view_once_skipped"] += 1
            return [Content(kind="notice", body="View-once media (not in the export)")]
        if isinstance(item.get("updateMessage"), dict):
            self.stats["notices"] += 1
            return [Content(kind="notice", body=update_text(item["updateMessage"]))]
        other = described(item)
        if other is None:
            self.stats["unknown_items"] += 1
            return None
        return [Content(kind="text", body=other)]


def _excerpt(entry: Any) -> str:
    try:
        return orjson.dumps(entry).decode()[:4000]
    except TypeError:
        return repr(type(entry))


def _contact_name(contact: dict[str, Any]) -> str | None:
    for keys in (
        ("nickname",),
        ("systemGivenName", "systemFamilyName"),
        ("profileGivenName", "profileFamilyName"),
    ):
        if keys == ("nickname",) and isinstance(contact.get("nickname"), dict):
            nick = contact["nickname"]
            parts = [nick.get("given"), nick.get("family")]
        else:
            parts = [contact.get(k) for k in keys]
        name = " ".join(p for p in parts if isinstance(p, str) and p).strip()
        if name:
            return name
    e164 = contact.get("e164")
    return f"+{e164}" if isinstance(e164, str | int) and str(e164).isdigit() else None


def update_text(update: dict[str, Any]) -> str:
    """A system item (updateMessage) as one line for a notice."""
    if isinstance(update.get("profileChange"), dict):
        change = update["profileChange"]
        return f"{change.get('previousName') or 'Someone'} changed their name to " + str(
            change.get("newName") or "?"
        )
    if isinstance(update.get("expirationTimerChange"), dict):
        ms = as_int(update["expirationTimerChange"].get("expiresInMs")) or 0
        return f"Disappearing messages set to {ms // 1000} s" if ms else "Disappearing messages off"
    if "groupChange" in update:
        return "The group was updated"
    if "individualCall" in update or "groupCall" in update:
        return "Call"
    simple = update.get("simpleUpdate")
    if isinstance(simple, dict) and isinstance(simple.get("type"), str):
        return f"Signal: {simple['type'].lower().replace('_', ' ')}"
    if isinstance(simple, dict):
        return "Signal: system update"  # a binary backup's enum number names no text
    kind = next(iter(update), "update")
    return f"Signal: {kind}"


def described(item: dict[str, Any]) -> str | None:
    """Contacts, polls and story replies as text; None for an item of an unknown kind."""
    contact = item.get("contactMessage")
    if isinstance(contact, dict):
        card = contact.get("contact")
        card = card[0] if isinstance(card, list) and card else card
        name = card.get("name") if isinstance(card, dict) else None
        name = name if isinstance(name, dict) else {}
        full = " ".join(str(name.get(k) or "") for k in ("givenName", "familyName")).strip()
        return f"Contact: {full or name.get('nickname') or 'unnamed'}"
    poll = item.get("poll")
    if isinstance(poll, dict):
        options = [o.get("option") for o in poll.get("options") or () if isinstance(o, dict)]
        lines = [f"Poll: {poll.get('question') or ''}", *(f"- {o}" for o in options if o)]
        return "\n".join(lines)
    reply = item.get("directStoryReplyMessage")
    if isinstance(reply, dict):
        text = (reply.get("textReply") or {}).get("text") or {}
        body = text.get("body") if isinstance(text, dict) else None
        return body or reply.get("emoji") or "Story reply"
    return None
