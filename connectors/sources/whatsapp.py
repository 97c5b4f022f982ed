"""WhatsApp "Export chat" files: a ``.txt`` alone or a ``.zip`` with the text and media.

The export is a plain-text log written in the phone's locale, so the parser is
forgiving about layout and strict about what it promises downstream:

- Android (``12/31/23, 9:41 PM - Alice: hi``) and iOS
  (``[31/12/2023, 21:41:05] Alice: hi``) layouts, 12/24-hour clocks, and the
  invisible marks iOS sprinkles in (U+200E, U+202F). The layout is fixed by the
  first line; later lines in another layout are message text.
- Day-first vs month-first is inferred from the whole file (a first pass reads
  only line headers, so memory stays flat); option ``date_order`` overrides.
- Times are local to the exporting phone: option ``tz`` (IANA name, default
  UTC) converts them. Messages that share a clock reading get +1 ms each so
  their order survives a sort by timestamp.
- The export carries no message ids, so ids are hashes of stable fields:
  (portal, clock reading, sender, text, n-th repeat within that reading).
  Importing the same or an overlapping export yields the same ids.
- Media are read from the zip in memory (never extracted to disk); entries
  whose names could escape a directory are refused.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources.scope import OutsideExport, UnreadableEntry
from connectors.sources.whatsapp_export import MAX_INLINE_BYTES, MAX_LINE_BYTES, ChatExport
from topics.records import Content, Member, NetworkMessage, PortalInfo, Sender

SYSTEM_SENDER = Sender(id="system", name="WhatsApp")

# Direction marks and isolates that iOS puts around names, dates and
# attachments; they carry no meaning for us.
_INVISIBLE = dict.fromkeys(
    map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")
)
_SPACES = {0x202F: " ", 0x00A0: " ", 0x2009: " "}

_DATE = r"(?P<d1>\d{1,4})[./-](?P<d2>\d{1,2})[./-](?P<d3>\d{2,4})"
_TIME = (
    r"(?P<h>\d{1,2})[:.](?P<mi>\d{2})(?:[:.](?P<s>\d{2}))?"
    r"(?:\s?(?P<ampm>[AaPp]\.?\s?[Mm]\.?))?"
)
LAYOUTS = {
    "android": re.compile(rf"^{_DATE},?\s+{_TIME}\s[-\u2013]\s(?P<rest>.*)$"),
    "ios": re.compile(rf"^\[{_DATE},?\s+{_TIME}\]\s(?P<rest>.*)$"),
}
_NAME_BODY = re.compile(r"^(?P<name>[^:\n]{1,100}?): (?P<body>.*)$", re.S)
_ENCRYPTION_BANNER = re.compile(
    r"^(Messages and calls are end-to-end encrypted|Messages to this (group|chat) are now "
    r"secured with end-to-end encryption|.{0,40}uses a default timer for disappearing)",
    re.I,
)
_OMITTED = re.compile(
    r"^(<Media omitted>|(image|video|audio|sticker|GIF|document|Contact card) omitted)$", re.I
)
_DELETED = re.compile(r"^(This message was deleted\.?|You deleted this message\.?)$", re.I)
_EDITED_SUFFIX = re.compile(r"\s*<This message was edited>$")
_ANDROID_ATTACHED = re.compile(r"^(?P<file>\S.*?\.\w{1,6}) \(file attached\)$")
_IOS_ATTACHED = re.compile(r"<attached: (?P<file>[^>]+)>")
_LOCATION = re.compile(
    r"^location: https://maps\.google\.com/\?q=(?P<lat>-?\d+(?:\.\d+)?),(?P<lon>-?\d+(?:\.\d+)?)$",
    re.I,
)
_IOS_GENERATED = re.compile(r"^[^:]{1,100}: \u200e")
_PHONE = re.compile(r"^\+[\d\s()-]{6,}$")


def _clean(text: str) -> str:
    return text.translate(_SPACES).translate(_INVISIBLE)


def _hash(*parts: object, size: int = 32) -> str:
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:size]


def sender_id(name: str) -> str:
    """A stable id from a display name: phone numbers keep their digits, names are hashed."""
    if _PHONE.match(name):
        return "+" + re.sub(r"\D", "", name)
    return "name-" + _hash(name, size=16)


def portal_id(title: str) -> str:
    """A stable portal id from the chat's title: readable slug plus a hash against clashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return f"{slug or 'chat'}-{_hash(title, size=10)}"


def media_type_of(mimetype: str | None) -> str:
    major = (mimetype or "").split("/", 1)[0]
    return major if major in ("image", "video", "audio") else "file"


def guess_mimetype(filename: str) -> str | None:
    lower = filename.lower()
    # mimetypes does not know WhatsApp's voice-note container.
    if lower.endswith(".opus"):
        return "audio/ogg"
    if lower.endswith(".webp"):
        return "image/webp"
    return mimetypes.guess_type(filename)[0]




# How far into a file the layout is looked for.
_LAYOUT_LINES = 200

# One message, header and continuation lines (WhatsApp allows 65,536 characters).
MAX_MESSAGE_BYTES = 256 * 1024


@dataclass(slots=True)
class _Pending:
    """A message whose header was read; continuation lines are still coming."""

    where: str
    raw_ts: int
    fine: bool  # the clock reading has seconds
    name: str | None
    lines: list[str]
    system_hint: bool  # iOS marks generated text with a leading U+200E
    size: int = 0  # bytes of continuation lines so far
    oversize: bool = False  # a line over the cap, or the message over MAX_MESSAGE_BYTES


class WhatsAppSource(Source):
    name = "whatsapp"
    network = "whatsapp"
    description = "WhatsApp 'Export chat' .txt or .zip (Android and iOS layouts)"

    def read(self) -> Iterator[SourceItem]:
        zone = self._zone()
        order_option = self.options.get("date_order")
        if order_option not in (None, "dmy", "mdy"):
            raise SourceError(f"option date_order must be dmy or mdy, got {order_option!r}")
        export = ChatExport(self.path, self.track)
        try:
            for name in export.refused:
                yield Rejected(
                    f"{self.path.name}:{name}",
                    "unsafe path in zip entry (absolute or '..'); entry ignored",
                    name,
                )
            layout = self._layout(export)
            day_first = order_option == "dmy" if order_option else self._infer_order(export, layout)
            yield from self._parse(export, layout, day_first, zone)
        finally:
            export.close()

    def _zone(self) -> ZoneInfo:
        tz = self.options.get("tz", "UTC")
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise SourceError(f"option tz: unknown time zone {tz!r} (use an IANA name)") from None

    def _layout(self, export: ChatExport) -> str:
        """Android or iOS, decided by the first line that is a message header.

        A file may start mid-message or with a notice without a date, so the
        first few lines are looked at, not only the first.
        """
        first: tuple[int, str] | None = None
        with export.lines() as lines:
            for number, raw in lines:
                if raw is None or number > _LAYOUT_LINES:
                    break
                text = _clean(raw.decode("utf-8", "replace")).rstrip("\r\n")
                if not text.strip():
                    continue
                for layout, regex in LAYOUTS.items():
                    if regex.match(text):
                        return layout
                first = first or (number, text)
        if first is None:
            raise SourceError(f"{export.chat_name}: no messages")
        number, text = first
        raise SourceError(f"{export.chat_name}:{number}: unknown date layout: {text[:80]!r}")

    def _infer_order(self, export: ChatExport, layout: str) -> bool:
        """True for day-first. A first pass over headers only, so memory stays flat."""
        regex = LAYOUTS[layout]
        day_first_at = month_first_at = None
        with export.lines() as lines:
            for number, raw in lines:
                if raw is None:
                    continue
                m = regex.match(_clean(raw.decode("utf-8", "replace")))
                if not m or len(m.group("d1")) > 2:
                    continue
                if day_first_at is None and int(m.group("d1")) > 12:
                    day_first_at = number
                if month_first_at is None and int(m.group("d2")) > 12:
                    month_first_at = number
        if day_first_at and month_first_at:
            raise SourceError(
                f"{export.chat_name}: conflicting dates: line {day_first_at} is day-first, "
                f"line {month_first_at} is month-first; pass --option date_order=dmy|mdy"
            )
        return month_first_at is None  # ambiguous files default to day-first

    def _parse(
        self, export: ChatExport, layout: str, day_first: bool, zone: ZoneInfo
    ) -> Iterator[SourceItem]:
        regex = LAYOUTS[layout]
        portal = self.options.get("portal") or portal_id(export.title)
        stats = self.stats
        for key in ("messages", "media", "media_too_large", "media_missing", "skipped"):
            stats.setdefault(key, 0)
        members: dict[str, Member] = {}
        yield PortalInfo(network=self.network, portal=portal, name=export.title)

        # Repeat counters only need the current clock reading: exports are in time order.
        state = {"raw_ts": None, "repeats": {}, "seq": 0}

        def flush(p: _Pending) -> Iterator[SourceItem]:
            if p.oversize:
                yield Rejected(p.where, f"message over {MAX_MESSAGE_BYTES} bytes: not imported")
                return
            if state["raw_ts"] != p.raw_ts:
                state.update(raw_ts=p.raw_ts, repeats={}, seq=0)
            body = "\n".join(p.lines).rstrip()
            key = (p.name, body)
            n = state["repeats"].get(key, 0)
            state["repeats"][key] = n + 1
            ident = _hash(portal, p.raw_ts, p.name or "", body, n)
            sender, content = self._content(export, p, body)
            if content is None:
                stats["skipped"] += 1
                return
            ts = p.raw_ts + min(state["seq"], 999 if p.fine else 59_999)
            state["seq"] += 1
            if sender is not SYSTEM_SENDER and sender.id not in members:
                members[sender.id] = Member(id=sender.id, name=sender.name)
            stats["messages"] += 1
            yield NetworkMessage(
                network=self.network,
                portal=portal,
                id=ident,
                sender=sender,
                ts=ts,
                content=content,
            )

        pending: _Pending | None = None
        # Where the last rejected header was: its continuation lines are
        # rejected with it, never glued onto the message before (someone else's).
        orphan_of: str | None = None
        with export.lines() as lines:
            for number, raw in lines:
                where = f"{export.chat_name}:{number}"
                if raw is None:
                    # No real message line is this long (WhatsApp caps a message
                    # at 65,536 characters): damage, so it ends the message before.
                    if pending is not None:
                        yield from flush(pending)
                    pending, orphan_of = None, where
                    yield Rejected(where, f"line over {MAX_LINE_BYTES} bytes: not read")
                    continue
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError:
                    replaced = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if regex.match(_clean(replaced)) is not None and pending is not None:
                        yield from flush(pending)  # a header: what follows is its text
                        pending, orphan_of = None, where
                    yield Rejected(where, "invalid UTF-8", replaced)
                    continue
                decoded = decoded.rstrip("\r\n")
                text = _clean(decoded)
                m = regex.match(text)
                if m is None:
                    if pending is not None and not pending.oversize:
                        pending.size += len(raw)
                        pending.oversize = pending.size > MAX_MESSAGE_BYTES
                        pending.lines.append(text)
                    elif pending is None and text.strip():
                        reason = (
                            f"continues the rejected message at line {orphan_of.rsplit(':', 1)[1]}"
                            if orphan_of
                            else "text before the first message header"
                        )
                        yield Rejected(where, reason, decoded)
                    continue
                try:
                    raw_ts = self._timestamp(m, day_first, zone)
                except ValueError as exc:
                    if pending is not None:
                        yield from flush(pending)
                    pending, orphan_of = None, where
                    yield Rejected(where, f"invalid date or time: {exc}", decoded)
                    continue
                if pending is not None:
                    yield from flush(pending)
                rest = m.group("rest")
                nb = _NAME_BODY.match(rest)
                # iOS prefixes generated text ("X added Y", "image omitted") with U+200E.
                raw_rest = decoded.split("] ", 1)[1] if layout == "ios" and "] " in decoded else ""
                hint = bool(_IOS_GENERATED.match(raw_rest))
                pending = _Pending(
                    where=where,
                    raw_ts=raw_ts,
                    fine=m.group("s") is not None,
                    name=nb.group("name").strip() if nb else None,
                    lines=[nb.group("body") if nb else rest],
                    system_hint=hint,
                )
            if pending is not None:
                yield from flush(pending)

        if members:
            yield PortalInfo(
                network=self.network,
                portal=portal,
                name=export.title,
                members=tuple(members.values()),
            )

    @staticmethod
    def _timestamp(m: re.Match[str], day_first: bool, zone: ZoneInfo) -> int:
        d1, d2, d3 = int(m.group("d1")), int(m.group("d2")), int(m.group("d3"))
        if len(m.group("d1")) > 2:
            year, month, day = d1, d2, d3
        else:
            day, month = (d1, d2) if day_first else (d2, d1)
            year = d3 + 2000 if d3 < 100 else d3
        hour, minute, second = int(m.group("h")), int(m.group("mi")), int(m.group("s") or 0)
        ampm = m.group("ampm")
        if ampm:
            if not 1 <= hour <= 12:
                raise ValueError(f"hour {hour} with {ampm}")
            pm = ampm.lower().startswith("p")
            hour = hour % 12 + (12 if pm else 0)
        dt = datetime(year, month, day, hour, minute, second, tzinfo=zone)
        return int(dt.timestamp()) * 1000

    def _content(self, export: ChatExport, p: _Pending, body: str) -> tuple[Sender, Content | None]:
        # The encryption banner is in every export and says nothing: skipped.
        if _ENCRYPTION_BANNER.match(body):
            return SYSTEM_SENDER, None
        if p.name is None:
            # System lines: "X added Y", "X changed the subject ...".
            return SYSTEM_SENDER, Content(kind="notice", body=body)
        sender = Sender(id=sender_id(p.name), name=p.name)
        body = _EDITED_SUFFIX.sub("", body)
        if _DELETED.match(body):
            return sender, None
        if _OMITTED.match(body):
            return sender, Content(kind="notice", body=body.strip("<>"))
        first, _, caption = body.partition("\n")
        attached = _ANDROID_ATTACHED.match(first)
        if attached:
            return sender, self._media(export, attached.group("file"), caption.strip())
        ios = _IOS_ATTACHED.search(first)
        if ios:
            rest = (first[: ios.start()] + first[ios.end() :]).strip() + "\n" + caption
            return sender, self._media(export, ios.group("file").strip(), rest.strip())
        if p.system_hint and p.name == export.title:
            # iOS writes system lines as if the chat itself said them, marked by U+200E.
            return SYSTEM_SENDER, Content(kind="notice", body=body)
        loc = _LOCATION.match(body)
        if loc:
            return sender, Content(
                kind="location", lat=float(loc["lat"]), lon=float(loc["lon"]), body=body
            )
        return sender, Content(kind="text", body=body)

    def _media(self, export: ChatExport, filename: str, caption: str) -> Content:
        try:
            found = export.media(filename)
        except (OutsideExport, UnreadableEntry) as exc:
            self.stats["media_refused"] = self.stats.get("media_refused", 0) + 1
            return Content(kind="notice", body=f"{filename} (not imported: {exc})")
        if found is None:
            self.stats["media_missing"] += 1
            return Content(kind="notice", body=f"{filename} (file not included in the export)")
        size, data = found
        if data is None:
            self.stats["media_too_large"] += 1
            return Content(
                kind="notice",
                body=f"{filename} ({size} bytes, too large to import; limit {MAX_INLINE_BYTES})",
            )
        self.stats["media"] += 1
        mimetype = guess_mimetype(filename)
        return Content(
            kind="media",
            media_type=media_type_of(mimetype),
            body=caption or filename,
            filename=filename,
            mimetype=mimetype,
            size=size,
            data=base64.b64encode(data).decode("ascii"),
        )
