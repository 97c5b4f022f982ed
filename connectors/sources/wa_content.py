"""One history-sync ``WebMessageInfo`` as canonical records.

Text, extended text with its reply, locations, reactions (inline on their
target), edits and revokes (protocol messages), system stubs as notices,
wrappers unwrapped first. Media in history sync are encrypted CDN links that
expire in about two weeks, never bytes: each becomes a notice saying what it
was (type, file name, size, caption). What is not understood is counted in
``stats`` and skipped or shown as a notice, never fatal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from google.protobuf.message import Message as ProtoMessage
from google.protobuf.unknown_fields import UnknownFieldSet

from connectors.sources.wa_ids import Identity, NotAJid, key_sender, non_ad, phone_name
from connectors.sources.wa_proto import WRAPPERS
from topics.records import MIN_TS, Content, NetworkMessage, Sender

NETWORK = "whatsapp"
SYSTEM_SENDER = Sender(id="system", name="WhatsApp")
# Phones run a little fast; anything further ahead is garbage (BRIEF: reject).
FUTURE_SKEW_S = 24 * 3600
MAX_UNWRAP = 8  # wrappers inside wrappers: a hostile row could nest them deeply

REVOKE, MESSAGE_EDIT = 0, 14
_STUBS = {
    20: "created the group",
    21: "changed the group name",
    22: "changed the group icon",
    23: "changed the group invite link",
    24: "changed the group description",
    25: "changed who can edit group info",
    26: "changed who can send messages",
    27: "added",
    28: "removed",
    29: "made admin",
    30: "dismissed as admin",
    31: "joined using an invite link",
    32: "left",
    33: "changed their phone number",
    40: "Missed voice call",
    41: "Missed video call",
}
_SKIPPED_STUBS = {1: "stub_revoked", 2: "stub_ciphertext", 39: "stub_encryption_banner"}
_MEDIA = {
    "image": ("Image", "image"),
    "video": ("Video", "video"),
    "ptv": ("Video note", "video"),
    "audio": ("Audio", "audio"),
    "document": ("Document", "file"),
    "sticker": ("Sticker", "image"),
}


def count(stats: dict[str, int], name: str, n: int = 1) -> None:
    stats[name] = stats.get(name, 0) + n


@dataclass
class Context:
    """What converting a chat's messages needs: who is who, names, counters."""

    identity: Identity
    name_of: Callable[[str, str], str | None]  # (sender JID, push name) -> display name
    stats: dict[str, int] = field(default_factory=dict)
    now_s: int = field(default_factory=lambda: int(time.time()))


class Refused(ValueError):
    """A message that cannot become a record: the reason names the field."""


def seconds_to_ms(value: int, now_s: int, what: str = "messageTimestamp") -> int:
    """WhatsApp's Unix seconds as ms; Refused for 0, before 2000 or in the future."""
    if value <= 0:
        raise Refused(f"field '{what}': timestamp {value} is not a time")
    if value * 1000 < MIN_TS:
        raise Refused(f"field '{what}': timestamp {value} is before 2000")
    if value > now_s + FUTURE_SKEW_S:
        raise Refused(f"field '{what}': timestamp {value} is in the future")
    return value * 1000


def unwrap(message: ProtoMessage) -> ProtoMessage:
    """The content inside ephemeral, view-once, device-sent ... wrappers."""
    for _ in range(MAX_UNWRAP):
        inner = None
        for name in WRAPPERS:
            if message.HasField(name):
                inner = getattr(message, name).message
                break
        if inner is None and message.HasField("device_sent"):
            inner = message.device_sent.message
        if inner is None:
            return message
        message = inner
    return message


def check_text(message: ProtoMessage, path: str = "") -> None:
    """Refused when a string field is not UTF-8 (proto2 parsing hands those over as bytes)."""
    for descriptor, value in message.ListFields():
        name = f"{path}.{descriptor.name}" if path else descriptor.name
        values = value if descriptor.is_repeated else (value,)
        if descriptor.type == descriptor.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                raise Refused(f"field '{name}': not valid UTF-8")
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            for v in values:
                check_text(v, name)


def convert(info: ProtoMessage, chat: str, ctx: Context) -> Iterator[NetworkMessage]:
    """The records of one WebMessageInfo in ``chat`` (a portal id); Refused if unusable."""
    check_text(info)
    key = info.key
    if not key.id:
        raise Refused("field 'key.ID': empty message id")
    try:
        sender_jid = key_sender(
            chat,
            ctx.identity,
            key.from_me,
            info.participant or key.participant,
            info.original_self_author,
        )
    except NotAJid as exc:
        raise Refused(f"field 'participant': {exc}") from None
    ts = seconds_to_ms(info.message_timestamp, ctx.now_s)
    ident = ctx.identity
    mid = ident.message_id(chat, sender_jid, key.id)
    sender = Sender(id=ident.ghost(sender_jid), name=ctx.name_of(sender_jid, info.push_name))
    base = {"network": NETWORK, "portal": chat, "id": mid, "sender": sender, "ts": ts}
    if info.HasField("comment_metadata"):
        thread = _target(info.comment_metadata.comment_parent_key, chat, ctx)
        if thread:
            base["thread"] = base["reply_to"] = thread
    content, reply_to = _content(info, chat, ctx)
    if content is not None:
        if reply_to and "reply_to" not in base:
            base["reply_to"] = reply_to
        yield NetworkMessage(content=content, **base)
    for reaction in info.reactions:
        record = _inline_reaction(reaction, mid, chat, ts, ctx)
        if record is not None:
            yield record


def _content(info: ProtoMessage, chat: str, ctx: Context) -> tuple[Content | None, str | None]:
    """(content, replied-to message id); content None = nothing to show (counted)."""
    if info.message_stub_type and not info.HasField("message"):
        return _stub(info, ctx), None
    if not info.HasField("message"):
        count(ctx.stats, "empty_messages")
        return None, None
    message = unwrap(info.message)
    stats = ctx.stats
    if message.HasField("protocol"):
        return _protocol(message.protocol, chat, ctx), None
    if message.HasField("reaction"):
        reaction = message.reaction
        target = _target(reaction.key, chat, ctx)
        if not reaction.text or not target:
            count(stats, "reaction_removals_skipped")
            return None, None
        count(stats, "reactions")
        return Content(kind="reaction", target=target, key=reaction.text[:255]), None
    if message.conversation:
        return Content(kind="text", body=message.conversation), None
    if message.HasField("extended_text"):
        ext = message.extended_text
        return Content(kind="text", body=ext.text or " "), _reply(ext, chat, ctx)
    for name, (label, _kind) in _MEDIA.items():
        if message.HasField(name):
            media = getattr(message, name)
            count(stats, "media_as_notice")
            return Content(kind="notice", body=describe_media(name, label, media)), _reply(
                media, chat, ctx
            )
    for name in ("location", "live_location"):
        if message.HasField(name):
            loc = getattr(message, name)
            text = "\n".join(p for p in (loc.name, loc.address) if p) or "Location"
            lat, lon = loc.degrees_latitude, loc.degrees_longitude
            body = f"{text} (geo:{lat},{lon})"
            return Content(kind="location", lat=lat, lon=lon, body=body), _reply(loc, chat, ctx)
    if message.HasField("contact"):
        contact = message.contact
        return Content(kind="notice", body=f"Contact: {contact.display_name or '?'}"), None
    if message.HasField("contacts_array"):
        names = [c.display_name or "?" for c in message.contacts_array.contacts[:50]]
        return Content(kind="notice", body="Contacts: " + ", ".join(names)), None
    for name in ("poll_creation", "poll_creation_v2", "poll_creation_v3"):
        if message.HasField(name):
            poll = getattr(message, name)
            options = "".join(f"\n- {o.option_name}" for o in poll.options[:64])
            return Content(kind="notice", body=f"Poll: {poll.name}{options}"), None
    if message.HasField("poll_update"):
        count(stats, "poll_votes_skipped")  # votes are encrypted to the poll's key
        return None, None
    unknown = sorted({f.field_number for f in UnknownFieldSet(message)})
    if unknown:
        count(stats, "unknown_message_types")
        numbers = ", ".join(map(str, unknown[:5]))
        return Content(kind="notice", body=f"Unsupported WhatsApp message (field {numbers})"), None
    count(stats, "empty_messages")
    return None, None


def describe_media(name: str, label: str, media: ProtoMessage) -> str:
    """'Document: report.pdf (application/pdf, 2.1 MB), caption' plus why it is not here."""
    if name == "audio" and media.ptt:
        label = "Voice message"
    title = ""
    if name == "document":
        title = media.file_name or media.title
    details = [d for d in (media.mimetype, _size(media.file_length)) if d]
    if getattr(media, "seconds", 0):
        details.append(f"{media.seconds // 60}:{media.seconds % 60:02d}")
    if getattr(media, "width", 0) and getattr(media, "height", 0):
        details.append(f"{media.width}×{media.height}")
    text = label + (f": {title}" if title else "")
    if details:
        text += f" ({', '.join(details)})"
    caption = getattr(media, "caption", "")
    if caption:
        text += f"\n{caption}"
    return text + "\n(not imported: media in WhatsApp history sync are expiring encrypted links)"


def _size(n: int) -> str:
    if not n:
        return ""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _reply(content: ProtoMessage, chat: str, ctx: Context) -> str | None:
    if not content.HasField("context_info"):
        return None
    info = content.context_info
    if not info.stanza_id:
        return None
    try:
        quoted = non_ad(info.participant) if info.participant else chat
        if quoted == chat and chat.endswith("@g.us"):
            return None  # a group quote without its sender cannot be named
    except NotAJid:
        count(ctx.stats, "replies_unresolved")
        return None
    return ctx.identity.message_id(chat, quoted, info.stanza_id)


def _target(key: ProtoMessage, chat: str, ctx: Context) -> str | None:
    """The bridge id of the message a key points at (None if it cannot be named)."""
    if not key.id:
        return None
    try:
        target_chat = non_ad(key.remote_jid) if key.remote_jid else chat
        # A key may name the phone JID of a chat the bridge moved to its LID.
        if target_chat != chat and ctx.identity.to_lid(target_chat) == chat:
            target_chat = chat
        sender = key_sender(target_chat, ctx.identity, key.from_me, key.participant)
    except NotAJid:
        count(ctx.stats, "targets_unresolved")
        return None
    return ctx.identity.message_id(target_chat, sender, key.id)


def _protocol(proto: ProtoMessage, chat: str, ctx: Context) -> Content | None:
    target = _target(proto.key, chat, ctx)
    if proto.type == REVOKE and target:
        count(ctx.stats, "revokes")
        return Content(kind="redaction", target=target)
    if proto.type == MESSAGE_EDIT and target and proto.HasField("edited_message"):
        edited = unwrap(proto.edited_message)
        body = edited.conversation or edited.extended_text.text
        for name in ("image", "video", "document"):
            if not body and edited.HasField(name):
                body = getattr(edited, name).caption
        if body:
            count(ctx.stats, "edits")
            return Content(kind="edit", target=target, body=body)
    count(ctx.stats, "protocol_messages_skipped")
    return None


def _stub(info: ProtoMessage, ctx: Context) -> Content | None:
    stub = info.message_stub_type
    if stub in _SKIPPED_STUBS:
        count(ctx.stats, _SKIPPED_STUBS[stub])
        return None
    params = [p for p in info.message_stub_parameters[:20] if p]
    shown = []
    for p in params:
        try:
            jid = non_ad(p)
            shown.append(ctx.name_of(jid, "") or phone_name(jid) or jid)
        except NotAJid:
            shown.append(p[:200])
    what = _STUBS.get(stub)
    count(ctx.stats, "system_notices")
    if what is None:
        body = f"WhatsApp system event {stub}" + (f": {', '.join(shown)}" if shown else "")
    elif stub in (40, 41):
        body = what
    else:
        body = what + (f" {', '.join(shown)}" if shown else "")
    return Content(kind="notice", body=body)


def _inline_reaction(
    reaction: ProtoMessage, target: str, chat: str, target_ts: int, ctx: Context
) -> NetworkMessage | None:
    """A reaction stored on its target (history sync keeps them there)."""
    if not reaction.text:
        return None
    key = reaction.key
    try:
        reactor = key_sender(chat, ctx.identity, key.from_me, key.participant)
    except NotAJid:
        count(ctx.stats, "reactions_unresolved")
        return None
    ts_ms = reaction.sender_timestamp_ms
    if not (MIN_TS <= ts_ms <= (ctx.now_s + FUTURE_SKEW_S) * 1000) or ts_ms < target_ts:
        ts_ms = target_ts  # unknown or odd: right after its target
    ident = ctx.identity
    count(ctx.stats, "reactions")
    return NetworkMessage(
        network=NETWORK,
        portal=chat,
        id=f"{target}:reaction:{ident.sender_in(chat, reactor)}",
        sender=Sender(id=ident.ghost(reactor), name=ctx.name_of(reactor, "")),
        ts=ts_ms,
        content=Content(kind="reaction", target=target, key=reaction.text[:255]),
    )
