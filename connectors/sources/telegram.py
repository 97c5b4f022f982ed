"""Telegram Desktop exports (JSON format): the export folder or its ``result.json``.

Both shapes are read: a single-chat export (top-level ``name``, ``id``,
``messages``) and a full account export (``chats.list[]`` and
``left_chats.list[]``). The file is parsed incrementally with ijson, one
message object at a time, so a multi-gigabyte export needs flat memory.

Mapping:
- portal = the chat ``id``; message id = ``str(message id)`` (unique per chat).
- ``date_unixtime`` is preferred; the older local ``date`` is read in option
  ``tz`` (IANA name, default UTC).
- ``text_entities`` become Matrix HTML (``html``) with a plain ``body``.
- ``reply_to_message_id`` becomes ``reply_to``.
- ``edited``: the export only holds the final text, which is imported as is.
- service messages (joins, pins, title changes, calls …): ``notice`` from the actor.
- ``photo`` / ``file``: read from the export folder (relative paths only, never
  outside the folder), inlined as base64 up to 512 KiB; larger or missing files
  become a notice, and a caption then follows as part 1.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
from collections.abc import Iterator
from datetime import datetime
from pathlib import PurePath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources.scope import ExportFolder, OutsideExport, read_bounded
from connectors.sources.shape import mismatch
from connectors.sources.stream import Entries, InvalidJSON, Skipped, TokenCapped, TooLarge, events
from topics.records import Content, Member, NetworkMessage, PortalInfo, Sender

MAX_INLINE_BYTES = 512 * 1024
CHAT_PREFIXES = ("", "chats.list.item", "left_chats.list.item")
SYSTEM_SENDER = Sender(id="telegram", name="Telegram")

# Entity type -> (opening tag, closing tag); the text inside is escaped.
_TAGS = {
    "bold": ("<strong>", "</strong>"),
    "italic": ("<em>", "</em>"),
    "underline": ("<u>", "</u>"),
    "strikethrough": ("<del>", "</del>"),
    "spoiler": ("<span data-mx-spoiler>", "</span>"),
    "code": ("<code>", "</code>"),
    "blockquote": ("<blockquote>", "</blockquote>"),
    "expandable_blockquote": ("<blockquote>", "</blockquote>"),
}
_MEDIA_KINDS = {
    "voice_message": "audio",
    "audio_file": "audio",
    "video_file": "video",
    "video_message": "video",
    "animation": "video",
    "sticker": "image",
}


# What the parser reads of a message (connectors/sources/shape.py); a message of
# another shape is rejected with the field named instead of crashing the import.
_ENTITY = {"type": str, "text": str, "href": str, "language": str}
_ID = (str, int)
MESSAGE_SHAPE = {
    "id": float,
    "type": str,
    "date": str,
    "date_unixtime": _ID,
    "from": str,
    "from_id": _ID,
    "actor": str,
    "actor_id": _ID,
    "action": str,
    "title": str,
    "new_title": str,
    "members": [str],
    "text": (str, [(str, _ENTITY)]),
    "text_entities": [_ENTITY],
    "reply_to_message_id": float,
    "message_id": float,
    "photo": str,
    "file": str,
    "file_name": str,
    "mime_type": str,
    "media_type": str,
    "width": float,
    "height": float,
    "duration_seconds": float,
    "location_information": {"latitude": float, "longitude": float},
    "place_name": str,
    "address": str,
    "poll": {"question": str, "answers": [{"text": str}]},
    "contact_information": {"first_name": str, "last_name": str, "phone_number": str},
}


def entities_to_html(entities: list[Any]) -> tuple[str, str | None]:
    """Telegram text (or ``text_entities``) to (plain body, HTML or None if unformatted)."""
    plain: list[str] = []
    rich: list[str] = []
    formatted = False
    for entity in entities:
        if isinstance(entity, str):
            entity = {"type": "plain", "text": entity}
        if not isinstance(entity, dict):
            continue
        text = str(entity.get("text") or "")
        kind = entity.get("type", "plain")
        plain.append(text)
        escaped = html.escape(text, quote=False)
        if kind == "pre":
            lang = entity.get("language")
            cls = f' class="language-{html.escape(lang)}"' if lang else ""
            rich.append(f"<pre><code{cls}>{escaped}</code></pre>")
            formatted = True
            continue
        escaped = escaped.replace("\n", "<br>") if kind != "code" else escaped
        if kind in _TAGS:
            start, end = _TAGS[kind]
            rich.append(f"{start}{escaped}{end}")
            formatted = True
        elif kind in ("text_link", "link", "email", "phone", "mention"):
            href = {
                "text_link": entity.get("href") or text,
                "link": text if "://" in text else f"https://{text}",
                "email": f"mailto:{text}",
                "phone": f"tel:{text.replace(' ', '')}",
                "mention": f"https://t.me/{text.lstrip('@')}",
            }[kind]
            rich.append(f'<a href="{html.escape(href)}">{escaped}</a>')
            formatted = True
        else:  # plain, hashtag, bot_command, mention_name, custom_emoji ...
            rich.append(escaped)
    return "".join(plain), ("".join(rich) if formatted else None)


_MEDIA_WORDS = {
    "sticker": "Sticker",
    "voice_message": "Voice message",
    "video_message": "Video message",
    "video_file": "Video",
    "animation": "GIF",
    "audio_file": "Audio",
}


def _omitted(msg: dict[str, Any]) -> str:
    """What a media message held, for a notice when the export left the file out."""
    what = "Photo" if "photo" in msg else _MEDIA_WORDS.get(msg.get("media_type") or "", "File")
    details = [str(msg["file_name"])] if isinstance(msg.get("file_name"), str) else []
    if isinstance(msg.get("sticker_emoji"), str):
        details.append(msg["sticker_emoji"])
    width, height, seconds = msg.get("width"), msg.get("height"), msg.get("duration_seconds")
    if isinstance(width, int | float) and isinstance(height, int | float):
        details.append(f"{int(width)}×{int(height)}")
    if isinstance(seconds, int | float):
        details.append(f"{int(seconds)} s")
    return what + (f" ({', '.join(details)})" if details else "")


def _service_body(msg: dict[str, Any]) -> str:
    actor = msg.get("actor") or "Someone"
    action = msg.get("action") or "service"
    title = msg.get("title")
    members = ", ".join(str(m) for m in msg.get("members") or () if m) or "someone"
    known = {
        "create_group": f"{actor} created the group «{title}»",
        "create_channel": f"{actor} created the channel «{title}»",
        "invite_members": f"{actor} added {members}",
        "remove_members": f"{actor} removed {members}",
        "join_group_by_link": f"{actor} joined the group via invite link",
        "edit_group_title": f"{actor} changed the group name to «{title}»",
        "edit_group_photo": f"{actor} changed the group photo",
        "delete_group_photo": f"{actor} removed the group photo",
        "pin_message": f"{actor} pinned a message",
        "migrate_to_supergroup": f"{actor} converted this group to a supergroup",
        "migrate_from_group": f"{actor} converted «{title}» to a supergroup",
        "clear_history": f"{actor} cleared the history",
        # Forum groups: the topic's title is what readers need to follow threads.
        "topic_created": f"{actor} created the topic «{title}»",
        "topic_edit": f"{actor} renamed the topic to «{msg.get('new_title') or title}»",
    }
    if action == "phone_call":
        duration = msg.get("duration_seconds")
        return f"{actor} called" + (f" ({duration} s)" if duration else "")
    return known.get(action) or f"{actor}: {action.replace('_', ' ')}"


def _excerpt(entry: Any) -> str:
    """An entry as JSON for a dead letter (bounded there; never raises)."""
    try:
        return json.dumps(entry, default=str)[:4000]
    except (TypeError, ValueError, RecursionError):
        return repr(type(entry))


class TelegramSource(Source):
    name = "telegram"
    network = "telegram"
    description = "Telegram Desktop JSON export (folder or result.json; one chat or all)"

    def read(self) -> Iterator[SourceItem]:
        path = self.path / "result.json" if self.path.is_dir() else self.path
        if not path.is_file():
            raise SourceError(f"{path}: no such file (expected a Telegram export's result.json)")
        self.folder = ExportFolder(path.parent)
        self.file = path.name
        tz = self.options.get("tz", "UTC")
        try:
            self.zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise SourceError(f"option tz: unknown time zone {tz!r} (use an IANA name)") from None
        only = {c.strip() for c in self.options.get("chats", "").split(",") if c.strip()}
        for key in ("messages", "media", "media_too_large", "media_missing", "skipped"):
            self.stats.setdefault(key, 0)
        chats = 0
        with path.open("rb") as handle:
            self.track(handle, path.stat().st_size)
            try:
                for chat, event, obj in self._walk(TokenCapped(handle, path.name)):
                    if event == "no id":
                        name = chat.get("name") or "without a name"
                        yield Rejected(
                            f"{self.file}:chat {name}",
                            "chat has no id before its messages: its messages are not imported",
                        )
                        continue
                    if chat["portal"] is None or (only and chat["portal"] not in only):
                        continue
                    if event == "start":
                        chats += 1
                        yield self._portal(chat, ())
                    elif event == "message":
                        yield from self._message(chat, obj)
                    elif event == "end" and chat["members"]:
                        yield self._portal(chat, tuple(chat["members"].values()))
            except InvalidJSON as exc:
                raise SourceError(f"{path.name}: {exc}") from None
            except TooLarge as exc:
                raise SourceError(str(exc)) from None
        if chats == 0 and not only:
            raise SourceError(f"{path.name}: no chats with messages found")

    def _walk(self, handle: Any) -> Iterator[tuple[dict[str, Any], str, Any]]:
        """(chat, "start" | "message" | "end", message) from a stream of parse events."""
        chat: dict[str, Any] = {}
        base = ""
        entries = Entries()
        for prefix, event, value in events(handle):
            if entries.building:
                done, msg = entries.feed(event, value)
                if done:
                    yield chat, "message", msg
                continue
            if event == "start_map" and prefix in CHAT_PREFIXES:
                base = f"{prefix}." if prefix else ""
                chat = {"members": {}}
            elif prefix in (f"{base}name", f"{base}id", f"{base}type") and event != "map_key":
                if isinstance(value, str) or (prefix == f"{base}id" and isinstance(value, int)):
                    chat[prefix[len(base) :]] = value
            elif prefix == f"{base}messages" and event == "start_array":
                cid = chat.get("id")
                if cid is None:
                    # Telegram writes the id before the messages; without it the
                    # chat has no portal: its messages are skipped, one reason.
                    chat["portal"] = None
                    yield chat, "no id", None
                    continue
                chat["portal"] = str(int(cid)) if isinstance(cid, float) else str(cid)
                yield chat, "start", None
            elif prefix == f"{base}messages" and event == "end_array":
                yield chat, "end", None
            elif prefix == f"{base}messages.item" and event == "start_map":
                entries.start(event, value)

    def _portal(self, chat: dict[str, Any], members: tuple[Member, ...]) -> PortalInfo:
        return PortalInfo(
            network=self.network,
            portal=chat["portal"],
            name=chat.get("name")
            or ("Saved Messages" if chat.get("type") == "saved_messages" else None)
            or f"Telegram chat {chat['portal']}",
            members=members,
        )

    def _ts(self, msg: dict[str, Any]) -> int:
        unix = msg.get("date_unixtime")
        if unix is not None:
            return int(unix) * 1000
        local = datetime.fromisoformat(str(msg["date"]))
        return int(local.replace(tzinfo=self.zone).timestamp()) * 1000

    def _message(self, chat: dict[str, Any], msg: Any) -> Iterator[SourceItem]:
        portal = chat["portal"]
        where = f"{self.file}:chat {portal}"
        if isinstance(msg, Skipped):
            known = msg.entry.get("id") if isinstance(msg.entry, dict) else None
            if isinstance(known, int):
                where = f"{where} message {known}"
            yield Rejected(where, msg.reason.replace("entry", "message", 1))
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("id"), int | float):
            yield Rejected(where, "message without an integer id", _excerpt(msg))
            return
        mid = str(int(msg["id"]))
        where = f"{where} message {mid}"
        self.at = where
        reason = mismatch(msg, MESSAGE_SHAPE)
        if reason is not None:
            yield Rejected(where, reason, _excerpt(msg))
            return
        try:
            ts = self._ts(msg)
        except (KeyError, TypeError, ValueError) as exc:
            yield Rejected(where, f"missing or malformed date: {exc}", _excerpt(msg))
            return
        service = msg.get("type") == "service"
        sender_id = msg.get("actor_id") if service else msg.get("from_id")
        sender_name = msg.get("actor") if service else msg.get("from")
        if sender_id:
            sender = Sender(id=str(sender_id), name=sender_name or None)
            chat["members"].setdefault(sender.id, Member(id=sender.id, name=sender.name))
        elif service:
            sender = SYSTEM_SENDER
        else:  # channel posts in older exports carry no author
            sender = Sender(id=f"chat{portal}", name=chat.get("name"))
        reply = msg.get("reply_to_message_id")
        base = {
            "network": self.network,
            "portal": portal,
            "id": mid,
            "sender": sender,
            "ts": ts,
            "reply_to": str(int(reply)) if isinstance(reply, int | float) else None,
        }

        raw = msg.get("text_entities")
        if raw is None:
            text = msg.get("text")
            raw = [text] if isinstance(text, str) else text or []
        body, rich = entities_to_html(raw)

        if service:
            if msg.get("action") == "pin_message" and msg.get("message_id") is not None:
                base["reply_to"] = str(int(msg["message_id"]))
            notice = body or _service_body(msg)
            self.stats["messages"] += 1
            yield NetworkMessage(**base, content=Content(kind="notice", body=notice, html=rich))
            return

        contents = self._contents(msg, body, rich, where)
        if not contents:
            self.stats["skipped"] += 1
            return
        self.stats["messages"] += 1
        for part, content in enumerate(contents):
            if isinstance(content, Rejected):
                yield content
            else:
                yield NetworkMessage(**base, part=part, content=content)

    def _contents(
        self, msg: dict[str, Any], body: str, rich: str | None, where: str
    ) -> list[Content | Rejected]:
        loc = msg.get("location_information")
        if isinstance(loc, dict) and "latitude" in loc and "longitude" in loc:
            label = msg.get("place_name") or msg.get("address") or body or "Location"
            return [
                Content(
                    kind="location",
                    lat=float(loc["latitude"]),
                    lon=float(loc["longitude"]),
                    body=label,
                )
            ]
        media_path = msg.get("photo") or msg.get("file")
        if isinstance(media_path, str):
            media = self._media(msg, media_path, body, where)
            if isinstance(media, Content) and media.kind == "media":
                return [media]
            caption = [Content(kind="text", body=body, html=rich)] if body else []
            return [media, *caption]
        extra = self._extra_text(msg)
        if extra:
            body = f"{body}\n{extra}" if body else extra
            rich = None if rich is None else f"{rich}<br>{html.escape(extra, quote=False)}"
        return [Content(kind="text", body=body, html=rich)] if body else []

    @staticmethod
    def _extra_text(msg: dict[str, Any]) -> str:
        """Polls and contact cards have no text of their own: describe them."""
        poll = msg.get("poll")
        if isinstance(poll, dict):
            answers = [a.get("text", "") for a in poll.get("answers") or () if isinstance(a, dict)]
            return "\n".join([f"Poll: {poll.get('question', '')}", *(f"- {a}" for a in answers)])
        contact = msg.get("contact_information")
        if isinstance(contact, dict):
            name = " ".join(str(contact.get(k) or "") for k in ("first_name", "last_name")).strip()
            return f"Contact: {name} {contact.get('phone_number') or ''}".strip()
        return ""

    def _media(self, msg: dict[str, Any], rel: str, caption: str, where: str) -> Content | Rejected:
        if rel.startswith(("(File", "(file")):
            # "(File not included. Change data exporting settings to download.)":
            # say what was left out instead of repeating that sentence.
            self.stats["media_missing"] += 1
            return Content(kind="notice", body=f"{_omitted(msg)}: not included in the export")
        label = msg.get("file_name") or PurePath(rel).name or "file"
        try:
            resolved = self.folder.locate(rel)
        except OutsideExport as exc:
            return Rejected(where, f"media path {exc}", rel)
        if resolved is None:
            self.stats["media_missing"] += 1
            return Content(kind="notice", body=f"{label} (file not included in the export)")
        size, data = read_bounded(resolved, MAX_INLINE_BYTES)
        if data is None:
            self.stats["media_too_large"] += 1
            return Content(
                kind="notice",
                body=f"{label} ({size} bytes, too large to import; limit {MAX_INLINE_BYTES})",
            )
        mimetype = msg.get("mime_type") or mimetypes.guess_type(resolved.name)[0]
        if "photo" in msg:
            mimetype = mimetype or "image/jpeg"
            media_type = "image"
        else:
            media_type = _MEDIA_KINDS.get(msg.get("media_type") or "")
            if media_type is None or (mimetype and not mimetype.startswith(media_type)):
                major = (mimetype or "").split("/", 1)[0]
                media_type = major if major in ("image", "video", "audio") else "file"
        duration = msg.get("duration_seconds")
        self.stats["media"] += 1
        return Content(
            kind="media",
            media_type=media_type,
            body=caption or label,
            filename=label,
            mimetype=mimetype,
            size=size,
            data=base64.b64encode(data).decode("ascii"),
            width=int(msg["width"]) if isinstance(msg.get("width"), int | float) else None,
            height=int(msg["height"]) if isinstance(msg.get("height"), int | float) else None,
            duration_ms=int(duration * 1000) if isinstance(duration, int | float) else None,
        )
