"""Canonical ``Content`` -> Matrix event content (pure, no I/O).

The sink resolves everything that needs the homeserver or the database first
(media -> mxc URI, reply/edit/reaction targets -> event ids) and passes the
results in; this module only shapes the content, as mautrix's typed event
content (which serializes edits, replies and threads the way the mautrix
bridges send them). Every event carries
``fi.backflow.source`` so the sink (and anyone else) can recognise it later,
which is what settling in-doubt sends after a crash relies on.
"""

from __future__ import annotations

import re
from typing import Any

import nh3
from mautrix.types import (
    AudioInfo,
    EventID,
    FileInfo,
    Format,
    ImageInfo,
    LocationMessageEventContent,
    MediaInfo,
    MediaMessageEventContent,
    MessageType,
    ReactionEventContent,
    RelatesTo,
    RelationType,
    TextMessageEventContent,
    VideoInfo,
)

from topics.records import Content, NetworkMessage

SOURCE_KEY = "fi.backflow.source"

# The Matrix spec's suggested allow-list for m.room.message formatted_body
# (client-server API, "m.room.message msgtypes", HTML). ``strike`` is the
# older spec's name for ``s``; both are kept so either renders.
ALLOWED_TAGS = frozenset(
    "font del h1 h2 h3 h4 h5 h6 blockquote p a ul ol sup sub li b i u strong em strike s "
    "code hr br div table thead tbody tr th td caption pre span img details summary".split()
)
ALLOWED_ATTRS: dict[str, set[str]] = {
    "font": {"data-mx-bg-color", "data-mx-color", "color"},
    "span": {"data-mx-bg-color", "data-mx-color", "data-mx-spoiler", "data-mx-maths"},
    "div": {"data-mx-maths"},
    "a": {"name", "target", "href"},
    "img": {"width", "height", "alt", "title", "src"},
    "ol": {"start"},
    "code": {"class"},
}
LINK_SCHEMES = frozenset({"https", "http", "ftp", "mailto", "magnet"})
# Elements whose text must go too, not only the tags.
_DROP_CONTENT = {"script", "style", "mx-reply", "head", "title", "iframe", "object"}
# An <img> that lost its (non-mxc) source would only be a broken image. nh3's
# output is normalised (lowercase, quoted attributes), so a regex is safe here.
_IMG_WITHOUT_SRC = re.compile(r"<img(?![^>]*\ssrc=)[^>]*>")


def _attribute_filter(tag: str, attr: str, value: str) -> str | None:
    """Per-attribute rules nh3's allow-lists cannot express."""
    if attr == "src":  # the spec only allows images from the homeserver
        return value if tag == "img" and value.startswith("mxc://") else None
    if attr == "href":  # mxc is allowed for img src only, not for links
        return None if value.lower().startswith("mxc:") else value
    if attr == "class":
        return value if tag == "code" and value.startswith("language-") else None
    if attr == "target":
        return value if value == "_blank" else None
    return value


def sanitize_html(html: str) -> str:
    """Keep only the spec's allowed tags/attributes (nh3, i.e. ammonia); drop scripts,
    styles, event handlers and URLs with other schemes."""
    clean = nh3.clean(
        html,
        tags=set(ALLOWED_TAGS),
        attributes=ALLOWED_ATTRS,
        url_schemes=set(LINK_SCHEMES | {"mxc"}),  # mxc only survives on img src (filter)
        clean_content_tags=_DROP_CONTENT,
        attribute_filter=_attribute_filter,
        link_rel=None,  # do not add rel=...: Matrix clients decide that
        strip_comments=True,
    )
    return _IMG_WITHOUT_SRC.sub("", clean)


def source_of(message: NetworkMessage) -> dict[str, Any]:
    return {
        "network": message.network,
        "portal": message.portal,
        "id": message.id,
        "part": message.part,
    }


def _text(msgtype: MessageType, body: str, html: str | None) -> TextMessageEventContent:
    content = TextMessageEventContent(msgtype=msgtype, body=body)
    if html:
        clean = sanitize_html(html)
        if clean.strip():
            content.format = Format.HTML
            content.formatted_body = clean
    return content


_MSGTYPES = {"text": MessageType.TEXT, "notice": MessageType.NOTICE, "emote": MessageType.EMOTE}
_MEDIA_MSGTYPES = {
    "image": MessageType.IMAGE,
    "file": MessageType.FILE,
    "audio": MessageType.AUDIO,
    "video": MessageType.VIDEO,
}


def media_info(c: Content, size: int | None = None) -> MediaInfo:
    """The info block of the msgtype: dimensions for images and video, duration for
    audio and video (the spec's fields for each)."""
    kind = c.media_type or "file"
    size = size if size is not None else c.size
    if kind == "audio":
        return AudioInfo(mimetype=c.mimetype, size=size, duration=c.duration_ms)
    if kind == "video":
        return VideoInfo(
            mimetype=c.mimetype, size=size, width=c.width, height=c.height, duration=c.duration_ms
        )
    if kind == "image":
        return ImageInfo(mimetype=c.mimetype, size=size, width=c.width, height=c.height)
    return FileInfo(mimetype=c.mimetype, size=size)


class _Edit(TextMessageEventContent):
    """An edit whose ``m.new_content`` (mautrix copies the whole content into it)
    leaves out our source marker: the marker names the edit, not the new text."""

    def serialize(self) -> dict[str, Any]:
        data = super().serialize()
        data["m.new_content"].pop(SOURCE_KEY, None)
        return data


Built = TextMessageEventContent | LocationMessageEventContent | ReactionEventContent


def build_content(
    message: NetworkMessage,
    *,
    mxc: str | None = None,
    media_size: int | None = None,
    reply_event: str | None = None,
    thread_root: str | None = None,
    target_event: str | None = None,
) -> tuple[str, Built]:
    """(event type, mautrix content) for a message whose references are already resolved.

    ``reply_event`` / ``thread_root``: event ids of ``reply_to`` / ``thread``
    (None when unknown: sent without the relation). ``target_event``: the event
    an edit or reaction points at (required for those kinds). Redactions are
    not built here: they go through the redact endpoint.
    """
    c = message.content
    kind = c.kind
    content: Built
    event_type = "m.room.message"
    if kind in _MSGTYPES:
        content = _text(_MSGTYPES[kind], c.body or "", c.html)
    elif kind == "media":
        if mxc is None:
            raise ValueError("media content needs an uploaded mxc URI")
        content = MediaMessageEventContent(
            msgtype=_MEDIA_MSGTYPES[c.media_type or "file"],
            body=c.body or c.filename or "file",
            url=mxc,
            info=media_info(c, media_size),
            filename=c.filename or None,
        )
    elif kind == "location":
        geo = f"geo:{c.lat},{c.lon}"
        content = LocationMessageEventContent(
            msgtype=MessageType.LOCATION, body=c.body or f"Location: {geo}", geo_uri=geo
        )
    elif kind == "edit":
        if target_event is None:
            raise ValueError("an edit needs its target event")
        # mautrix serializes an edit with the "* " fallback and m.new_content.
        text = _text(MessageType.TEXT, c.body or "", c.html)
        content = _Edit(
            msgtype=text.msgtype,
            body=text.body,
            format=text.format,
            formatted_body=text.formatted_body,
        )
        content.set_edit(EventID(target_event))
        reply_event = thread_root = None  # an edit carries no other relation
    elif kind == "reaction":
        if target_event is None:
            raise ValueError("a reaction needs its target event")
        event_type = "m.reaction"
        content = ReactionEventContent(
            relates_to=RelatesTo(
                rel_type=RelationType.ANNOTATION, event_id=EventID(target_event), key=c.key
            )
        )
        reply_event = thread_root = None
    else:
        raise ValueError(f"content kind {kind!r} is not sent as an event")

    if isinstance(content, TextMessageEventContent | LocationMessageEventContent):
        if thread_root is not None:
            # Threads with the spec's fallback: clients without thread support see
            # a reply to the latest known event (the root, or the explicit reply).
            content.set_thread_parent(
                EventID(thread_root), EventID(reply_event) if reply_event else None
            )
            content.relates_to.is_falling_back = reply_event is None
        elif reply_event is not None:
            content.set_reply(EventID(reply_event))
    content[SOURCE_KEY] = source_of(message)
    return event_type, content


def redaction_content(message: NetworkMessage) -> dict[str, Any]:
    """Body of the redact request (Synapse stores it as the redaction's content)."""
    # The target's own marker disappears with its content; naming the target
    # here lets settling recognise a redacted event after a crash.
    source = {**source_of(message), "target": message.content.target}
    content: dict[str, Any] = {SOURCE_KEY: source}
    if message.content.reason:
        content["reason"] = message.content.reason
    return content
