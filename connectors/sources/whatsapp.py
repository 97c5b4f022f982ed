"""WhatsApp "Export chat" files: a ``.txt`` alone or a ``.zip`` with the text and media.

The export is a plain-text log written in the phone's locale, so the parser is
forgiving about layout and strict about what it promises downstream:

- The header layouts and locales of :mod:`connectors.sources.whatsapp_header`
  (Android, iOS with and without brackets, time first, month names, Arabic,
  Finnish, Buddhist-era years …). The first header in the file fixes the
  layout; later lines in another layout are message text.
- A first pass reads only headers (memory stays flat) and decides the date
  order from the whole file; when the order is only a guess, one warning names
  the option ``date_order``. Years left out of headers count back from the
  export's date (option ``year``).
- Times are local to the exporting phone: option ``tz`` (IANA name, default
  UTC) converts them. Messages that share a clock reading get +1 ms each so
  their order survives a sort by timestamp.
- The export carries no message ids, so ids are hashes of stable fields:
  (portal, clock reading, sender, text, n-th repeat within that reading).
  Importing the same or an overlapping export yields the same ids.
- A refused header ends the message before it; its continuation lines are
  rejected with it, never glued onto someone else's message.
- Media are read from the zip in memory (never extracted to disk); entries
  whose names could escape a directory are refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources.whatsapp_content import (
    MAX_INLINE_BYTES,
    SYSTEM_SENDER,
    media_type_of,
    message_content,
    sender_id,
)
from connectors.sources.whatsapp_export import MAX_LINE_BYTES, ChatExport
from connectors.sources.whatsapp_header import (
    LAYOUTS,
    ORDERS,
    Header,
    OrderEvidence,
    clean,
    detect_layout,
    evidence_of,
    parse_header,
    timestamp_ms,
)
from topics.records import Member, NetworkMessage, PortalInfo

# The connector's public names, some defined beside it (tests and other
# connectors take them from here).
__all__ = [
    "MAX_INLINE_BYTES",
    "MAX_LINE_BYTES",
    "MAX_MESSAGE_BYTES",
    "SYSTEM_SENDER",
    "WhatsAppSource",
    "media_type_of",
    "portal_id",
    "sender_id",
]

_NAME_BODY = re.compile(r"^(?P<name>[^:\n]{1,100}?): (?P<body>.*)$", re.S)
# iOS marks generated text ("X added Y", "image omitted", "security code
# changed") with U+200E right after the name.
_GENERATED = re.compile(r": \u200e")

# How far into a file the layout is looked for.
_LAYOUT_LINES = 200
# Other chats beside a .txt looked at for its date order, and how far into each.
_MAX_SIBLINGS = 20
_SIBLING_LINES = 5_000
# One message, header and continuation lines (WhatsApp allows 65,536 characters).
MAX_MESSAGE_BYTES = 256 * 1024
# Participants remembered for a portal id without a title (the first ones suffice).
_MAX_SURVEY_SENDERS = 64


def _hash(*parts: object, size: int = 32) -> str:
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:size]


def _is_generated(raw_line: str) -> bool:
    return _GENERATED.search(raw_line[:300]) is not None


def portal_id(title: str, participants: Iterable[str] = ()) -> str:
    """A stable portal id from the chat's title: readable slug plus a hash against clashes.

    ``participants`` joins the hash when the title is only a stand-in (a
    folder name), so unrelated chats under the same stand-in stay apart.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return f"{slug or 'chat'}-{_hash(title, *participants, size=10)}"


@dataclass(slots=True)
class _Pending:
    """A message whose header was read; continuation lines are still coming."""

    where: str
    raw_ts: int
    fine: bool  # the clock reading has seconds
    name: str | None
    lines: list[str]
    system_hint: bool  # iOS marks generated text with U+200E
    size: int = 0  # bytes of continuation lines so far
    oversize: bool = False  # the message is over MAX_MESSAGE_BYTES


@dataclass(slots=True)
class _Survey:
    """What the first pass over the headers found."""

    layout: str = "android"
    evidence: OrderEvidence = field(default_factory=OrderEvidence)
    chat_name: str | None = None  # the name on iOS's first generated line: the chat's
    senders: set[str] = field(default_factory=set)
    named_wraps: int = 0  # month-name headers: times the month went back (a new year)
    named_last: tuple[int, int] | None = None  # (month, day) of the last one

    def add(self, header: Header, line: int, generated: bool) -> None:
        self.evidence.add(header, line)
        nb = _NAME_BODY.match(header.rest)
        if nb is not None:
            name = nb.group("name").strip()
            if generated and self.chat_name is None:
                self.chat_name = name
            elif len(self.senders) < _MAX_SURVEY_SENDERS:
                self.senders.add(name)
        if header.named is not None and header.named[2] is None:
            month_day = header.named[:2]
            if self.named_last is not None and month_day[0] < self.named_last[0]:
                self.named_wraps += 1
            self.named_last = month_day


@dataclass(frozen=True, slots=True)
class _Chat:
    title: str
    known: bool  # the title is the chat's own, not a stand-in
    portal: str


@dataclass(slots=True)
class _Years:
    """The year of headers written without one: the first, plus one per wrap."""

    year: int
    last_month: int = 0

    def timestamp(self, header: Header, order: str, zone: ZoneInfo) -> int:
        if header.named is not None and header.named[2] is None:
            if header.named[0] < self.last_month:
                self.year += 1
            self.last_month = header.named[0]
        return timestamp_ms(header, order, zone, self.year)


class WhatsAppSource(Source):
    name = "whatsapp"
    network = "whatsapp"
    description = "WhatsApp 'Export chat' .txt or .zip (Android and iOS layouts, many locales)"

    def read(self) -> Iterator[SourceItem]:
        zone = self._zone()
        order_option = self.options.get("date_order")
        if order_option not in (None, *ORDERS):
            raise SourceError(f"option date_order must be dmy, mdy or ymd, got {order_option!r}")
        export = ChatExport(self.path, self.track)
        try:
            for name in export.refused:
                yield Rejected(
                    f"{self.path.name}:{name}",
                    "unsafe path in zip entry (absolute or '..'); entry ignored",
                    name,
                )
            layout = self._layout(export)
            survey = self._survey(export, layout)
            order = order_option or self._order(export, survey)
            chat = self._chat(export, survey)
            yield from self._parse(export, layout, order, zone, chat, survey)
        finally:
            export.close()

    def _zone(self) -> ZoneInfo:
        tz = self.options.get("tz", "UTC")
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise SourceError(f"option tz: unknown time zone {tz!r} (use an IANA name)") from None

    def _layout(self, export: ChatExport) -> str:
        """The layout of the first line that is a message header.

        A file may start mid-message or with a notice without a date, so the
        first few lines are looked at, not only the first.
        """
        first: tuple[int, str] | None = None
        with export.lines() as lines:
            for number, raw in lines:
                if raw is None or number > _LAYOUT_LINES:
                    break
                text = clean(raw.decode("utf-8", "replace")).rstrip("\r\n")
                if not text.strip():
                    continue
                layout = detect_layout(text)
                if layout is not None:
                    return layout
                first = first or (number, text)
        if first is None:
            raise SourceError(f"{export.chat_name}: no messages")
        number, text = first
        raise SourceError(f"{export.chat_name}:{number}: unknown date layout: {text[:80]!r}")

    def _survey(self, export: ChatExport, layout: str) -> _Survey:
        """A first pass over the headers only (memory stays flat): dates, names, years."""
        regex = LAYOUTS[layout]
        survey = _Survey(layout=layout)
        with export.lines() as lines:
            for number, raw in lines:
                if raw is None:
                    continue
                decoded = raw.decode("utf-8", "replace")
                try:
                    header = parse_header(regex, clean(decoded).rstrip("\r\n"))
                except ValueError:
                    continue
                if header is not None:
                    survey.add(header, number, _is_generated(decoded))
        return survey

    def _order(self, export: ChatExport, survey: _Survey) -> str:
        try:
            decision = survey.evidence.decide()
        except ValueError as exc:
            raise SourceError(
                f"{export.chat_name}: {exc}; pass -o date_order=dmy|mdy|ymd"
            ) from None
        if not decision.certain and export.zip is None:
            sibling = self._sibling_order(export, survey.layout)
            if sibling is not None:
                return sibling
        if not decision.certain:
            self.warn(
                f"{export.chat_name}: the date order is a guess, {decision.order} "
                f"({decision.reason}); if the dates look wrong, pass -o date_order=mdy|dmy|ymd"
            )
        return decision.order

    def _sibling_order(self, export: ChatExport, layout: str) -> str | None:
        """The date order other chats exported beside this ``.txt`` prove, if they agree.

        Exports from one phone share its locale; see ``ChatExport.siblings``.
        """
        orders: set[str] = set()
        for lines in export.siblings(_MAX_SIBLINGS, _SIBLING_LINES):
            evidence = evidence_of(LAYOUTS[layout], lines)
            try:
                decision = evidence.decide()
            except ValueError:
                continue
            if decision.certain and evidence.headers:
                orders.add(decision.order)
        if len(orders) != 1:
            return None
        (order,) = orders
        self.warn(
            f"{export.chat_name}: the date order ({order}) comes from other chats exported "
            f"beside it; pass -o date_order=mdy|dmy|ymd if the dates look wrong"
        )
        return order

    def _chat(self, export: ChatExport, survey: _Survey) -> _Chat:
        """The chat's title and portal id.

        The title comes from the file, zip or folder name WhatsApp gave the
        export; an iOS ``_chat.txt`` elsewhere is named by its first system
        line (the chat itself says it). Without either, the portal id also
        hashes the participants, so two unrelated ``_chat.txt`` never merge.
        """
        if export.title is not None:
            title, known = export.title, True
        elif survey.chat_name is not None:
            title, known = survey.chat_name, True
        else:
            title, known = export.fallback_name, False
        portal = self.options.get("portal")
        if portal is None:
            portal = portal_id(title) if known else portal_id(title, sorted(survey.senders))
            if not known:
                self.warn(
                    f"{export.chat_name}: no chat title in the file or folder name; portal id "
                    f"{portal} from {title!r} and the participants (set -o portal=ID to choose)"
                )
        return _Chat(title=title, known=known, portal=portal)

    def _parse(
        self,
        export: ChatExport,
        layout: str,
        order: str,
        zone: ZoneInfo,
        chat: _Chat,
        survey: _Survey,
    ) -> Iterator[SourceItem]:
        regex = LAYOUTS[layout]
        portal = chat.portal
        stats = self.stats
        for key in ("messages", "media", "media_too_large", "media_missing", "skipped"):
            stats.setdefault(key, 0)
        members: dict[str, Member] = {}
        yield PortalInfo(network=self.network, portal=portal, name=chat.title)
        years = self._years(export, survey)

        # Repeat counters only need the current clock reading: exports are in time order.
        state = {"raw_ts": None, "repeats": {}, "seq": 0}

        def flush(p: _Pending) -> Iterator[SourceItem]:
            if p.oversize:
                yield Rejected(p.where, f"message over {MAX_MESSAGE_BYTES} bytes: not imported")
                return
            self.at = p.where
            if state["raw_ts"] != p.raw_ts:
                state.update(raw_ts=p.raw_ts, repeats={}, seq=0)
            body = "\n".join(p.lines).rstrip()
            if not body:
                yield Rejected(p.where, "empty message: a header with no text after the name")
                return
            key = (p.name, body)
            n = state["repeats"].get(key, 0)
            state["repeats"][key] = n + 1
            ident = _hash(portal, p.raw_ts, p.name or "", body, n)
            # iOS writes system lines as if the chat itself said them, marked by U+200E.
            system_line = p.system_hint and (p.name == chat.title or not chat.known)
            sender, content = message_content(export, p.name, body, system_line, stats)
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
                    if detect_layout(clean(replaced)) == layout and pending is not None:
                        yield from flush(pending)  # a header: what follows is its text
                        pending, orphan_of = None, where
                    yield Rejected(where, "invalid UTF-8", replaced)
                    continue
                decoded = decoded.rstrip("\r\n")
                text = clean(decoded)
                try:
                    header = parse_header(regex, text)
                    raw_ts = None if header is None else years.timestamp(header, order, zone)
                except ValueError as exc:
                    if pending is not None:
                        yield from flush(pending)
                    pending, orphan_of = None, where
                    yield Rejected(where, f"invalid date or time: {exc}", decoded)
                    continue
                if header is None or raw_ts is None:
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
                if pending is not None:
                    yield from flush(pending)
                nb = _NAME_BODY.match(header.rest)
                pending = _Pending(
                    where=where,
                    raw_ts=raw_ts,
                    fine=header.second is not None,
                    name=nb.group("name").strip() if nb else None,
                    lines=[nb.group("body") if nb else header.rest],
                    system_hint=_is_generated(decoded),
                )
            if pending is not None:
                yield from flush(pending)

        if members:
            yield PortalInfo(
                network=self.network,
                portal=portal,
                name=chat.title,
                members=tuple(members.values()),
            )

    def _years(self, export: ChatExport, survey: _Survey) -> _Years:
        """Years for headers written without one (month names): counted back from the end."""
        option = self.options.get("year")
        if option is not None:
            if not option.isdigit() or not 1970 <= int(option) <= 2100:
                raise SourceError(f"option year must be a year like 2023, got {option!r}")
            last_year = int(option)
        elif survey.named_last is None:
            return _Years(0)
        else:
            written = export.written()
            last_year = written.year
            if survey.named_last > (written.month, written.day):
                last_year -= 1  # the last message cannot be after the export was made
            self.warn(
                f"{export.chat_name}: the dates have no year; the last message is taken to be "
                f"from {last_year} (the export's date); pass -o year=YYYY if it is not"
            )
        return _Years(last_year - survey.named_wraps)
