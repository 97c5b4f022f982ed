"""Canonical ``Content`` -> Matrix event content (pure, no I/O).

The sink resolves everything that needs the homeserver or the database first
(media -> mxc URI, reply/edit/reaction targets -> event ids) and passes the
results in; this module only shapes JSON. Every event carries
``fi.backflow.source`` so the sink (and anyone else) can recognise it later,
which is what settling in-doubt sends after a crash relies on.
"""

from __future__ import annotations

import re
from typing import Any

import nh3

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


def _text(msgtype: str, body: str, html: str | None) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": msgtype, "body": body}
    if html:
        clean = sanitize_html(html)
        if clean.strip():
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = clean
    return content


_MSGTYPES = {"text": "m.text", "notice": "m.notice", "emote": "m.emote"}
_MEDIA_MSGTYPES = {"image": "m.image", "file": "m.file", "audio": "m.audio", "video": "m.video"}


def media_info(c: Content, size: int | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if c.mimetype:
        info["mimetype"] = c.mimetype
    if size is not None or c.size is not None:
        info["size"] = size if size is not None else c.size
    if c.width is not None:
        info["w"] = c.width
    if c.height is not None:
        info["h"] = c.height
    if c.duration_ms is not None:
        info["duration"] = c.duration_ms
    return info


def build_content(
    message: NetworkMessage,
    *,
    mxc: str | None = None,
    media_size: int | None = None,
    reply_event: str | None = None,
    thread_root: str | None = None,
    target_event: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(event type, content) for a message whose references are already resolved.

    ``reply_event`` / ``thread_root``: event ids of ``reply_to`` / ``thread``
    (None when unknown: sent without the relation). ``target_event``: the event
    an edit or reaction points at (required for those kinds). Redactions are
    not built here: they go through the redact endpoint.
    """
    c = message.content
    kind = c.kind
    if kind in _MSGTYPES:
        event_type = "m.room.message"
        content = _text(_MSGTYPES[kind], c.body or "", c.html)
    elif kind == "media":
        if mxc is None:
            raise ValueError("media content needs an uploaded mxc URI")
        event_type = "m.room.message"
        body = c.body or c.filename or "file"
        content = {
            "msgtype": _MEDIA_MSGTYPES[c.media_type or "file"],
            "body": body,
            "url": mxc,
            "info": media_info(c, media_size),
        }
        if c.filename:
            content["filename"] = c.filename
    elif kind == "location":
        event_type = "m.room.message"
        geo = f"geo:{c.lat},{c.lon}"
        content = {"msgtype": "m.location", "body": c.body or f"Location: {geo}", "geo_uri": geo}
    elif kind == "edit":
        if target_event is None:
            raise ValueError("an edit needs its target event")
        event_type = "m.room.message"
        new = _text("m.text", c.body or "", c.html)
        content = {
            "msgtype": "m.text",
            "body": f"* {new['body']}",
            "m.new_content": new,
            "m.relates_to": {"rel_type": "m.replace", "event_id": target_event},
        }
        if "formatted_body" in new:
            content["format"] = new["format"]
            content["formatted_body"] = f"* {new['formatted_body']}"
        reply_event = thread_root = None  # an edit carries no other relation
    elif kind == "reaction":
        if target_event is None:
            raise ValueError("a reaction needs its target event")
        event_type = "m.reaction"
        content = {
            "m.relates_to": {"rel_type": "m.annotation", "event_id": target_event, "key": c.key}
        }
        reply_event = thread_root = None
    else:
        raise ValueError(f"content kind {kind!r} is not sent as an event")

    if thread_root is not None:
        # Threads with the spec's fallback: clients without thread support see
        # a reply to the latest known event (the root, or the explicit reply).
        content["m.relates_to"] = {
            "rel_type": "m.thread",
            "event_id": thread_root,
            "is_falling_back": reply_event is None,
            "m.in_reply_to": {"event_id": reply_event or thread_root},
        }
    elif reply_event is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_event}}
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
