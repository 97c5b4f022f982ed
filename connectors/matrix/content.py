"""Canonical ``Content`` -> Matrix event content (pure, no I/O).

The sink resolves everything that needs the homeserver or the database first
(media -> mxc URI, reply/edit/reaction targets -> event ids) and passes the
results in; this module only shapes JSON. Every event carries
``fi.backflow.source`` so the sink (and anyone else) can recognise it later,
which is what settling in-doubt sends after a crash relies on.
"""

from __future__ import annotations

from html import escape as html_escape
from html.parser import HTMLParser
from typing import Any

from topics.records import Content, NetworkMessage

SOURCE_KEY = "fi.backflow.source"

# The Matrix spec's suggested allow-list for m.room.message formatted_body
# (client-server API, "m.room.message msgtypes", HTML).
ALLOWED_TAGS = frozenset(
    "del h1 h2 h3 h4 h5 h6 blockquote p a ul ol sup sub li b i u strong em s code hr br "
    "div table thead tbody tr th td caption pre span img details summary font".split()
)
_VOID = frozenset({"br", "hr", "img"})
# Elements whose text must go too, not only the tags.
_DROP_CONTENT = frozenset({"script", "style", "mx-reply", "head", "title", "iframe", "object"})
_ALLOWED_ATTRS: dict[str, frozenset[str]] = {
    "font": frozenset({"data-mx-bg-color", "data-mx-color", "color"}),
    "span": frozenset({"data-mx-bg-color", "data-mx-color", "data-mx-spoiler", "data-mx-maths"}),
    "div": frozenset({"data-mx-maths"}),
    "a": frozenset({"name", "target", "href"}),
    "img": frozenset({"width", "height", "alt", "title", "src"}),
    "ol": frozenset({"start"}),
    "code": frozenset({"class"}),
}
_LINK_SCHEMES = ("https:", "http:", "ftp:", "mailto:", "magnet:", "matrix:")
MAX_NESTING = 100  # the spec suggests limiting nesting; deeper tags are dropped


class _Sanitizer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[str] = []  # open allowed tags
        self.dropping = 0  # depth inside a _DROP_CONTENT element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_CONTENT:
            self.dropping += 1
            return
        if self.dropping or tag not in ALLOWED_TAGS:
            return
        if tag not in _VOID and len(self.stack) >= MAX_NESTING:
            return
        kept = []
        allowed = _ALLOWED_ATTRS.get(tag, frozenset())
        for name, value in attrs:
            if name not in allowed or value is None:
                continue
            v = value.strip()
            if name == "href" and not v.lower().startswith(_LINK_SCHEMES):
                continue
            if name == "src" and not v.startswith("mxc://"):
                continue  # the spec only allows media from the homeserver
            if name == "class" and not (tag == "code" and v.startswith("language-")):
                continue
            if name == "target" and v != "_blank":
                continue
            kept.append(f' {name}="{html_escape(v, quote=True)}"')
        if tag == "img" and not any(k.startswith(" src=") for k in kept):
            return  # an image without an mxc source would only be a broken link
        self.out.append(f"<{tag}{''.join(kept)}>")
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID and self.stack and self.stack[-1] == tag:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP_CONTENT:
            self.dropping = max(0, self.dropping - 1)
            return
        if self.dropping or tag not in self.stack:
            return
        # Close everything opened after it too, so the output is well nested.
        while self.stack:
            top = self.stack.pop()
            self.out.append(f"</{top}>")
            if top == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self.dropping:
            self.out.append(html_escape(data, quote=False))

    def result(self) -> str:
        self.close()
        while self.stack:
            self.out.append(f"</{self.stack.pop()}>")
        return "".join(self.out)


def sanitize_html(html: str) -> str:
    """Keep only the spec's allowed tags/attributes; drop scripts, styles, handlers, bad URLs."""
    parser = _Sanitizer()
    parser.feed(html)
    return parser.result()


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
