"""WhatsApp message headers: the date-and-time prefix of each message line.

Pure functions, no I/O. Phones write the prefix in their locale's form, and
the export says nothing about which form it used, so this module

- knows the layouts seen in real exports (:data:`LAYOUTS`; the first header
  in a file decides which one the file uses),
- normalizes what locales vary in (Arabic-Indic digits, the Arabic comma,
  localized AM/PM markers, Buddhist-era years, dots in times), and
- decides the order of the date fields from the evidence of the whole file
  (:class:`OrderEvidence`), saying when that order is only a guess.
"""

from __future__ import annotations

import re
from calendar import monthrange
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

# Direction marks and isolates that iOS puts around names, dates and
# attachments; they carry no meaning for us.
_INVISIBLE = dict.fromkeys(
    map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")
)
_TRANSLATE = {
    **_INVISIBLE,
    0x202F: " ",  # narrow no-break space (iOS before AM/PM)
    0x00A0: " ",
    0x2009: " ",
    0x060C: ",",  # Arabic comma
    **{0x0660 + i: str(i) for i in range(10)},  # Arabic-Indic digits
    **{0x06F0 + i: str(i) for i in range(10)},  # Extended (Persian) digits
}


def clean(text: str) -> str:
    """``text`` with invisible marks removed and locale digits and spaces made plain."""
    return text.translate(_TRANSLATE)


# Localized AM/PM markers. Arabic writes ص/م, East Asian locales put the
# marker before the time.
_AM = ("am", "a.m.", "a. m.", "a.m", "ص", "上午", "午前", "오전", "vorm.", "πμ", "π.μ.")
_PM = ("pm", "p.m.", "p. m.", "p.m", "م", "下午", "午後", "오후", "nachm.", "μμ", "μ.μ.")
_MARKER = "(?i:" + "|".join(re.escape(m) for m in sorted(_AM + _PM, key=len, reverse=True)) + ")"
_PM_SET = frozenset(_PM)

_TIME = (
    rf"(?:(?P<pre>{_MARKER})\s?)?"
    r"(?P<h>\d{1,2})[:.](?P<mi>\d{2})(?:[:.](?P<s>\d{2}))?"
    rf"(?:\s?(?P<ampm>{_MARKER}))?"
)
# 31/12/2023, 12.31.23, 2023-12-31, 13. 6. 2018. (one separator per date)
_NUMERIC = r"(?P<d1>\d{1,4})(?P<sep>[./-])\s?(?P<d2>\d{1,2})(?P=sep)\s?(?P<d3>\d{2,4})\.?"
_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("jan", "january"),
            ("feb", "february"),
            ("mar", "march"),
            ("apr", "april"),
            ("may",),
            ("jun", "june"),
            ("jul", "july"),
            ("aug", "august"),
            ("sep", "sept", "september"),
            ("oct", "october"),
            ("nov", "november"),
            ("dec", "december"),
        ),
        start=1,
    )
    for name in names
}
_MONTH = r"(?P<mon>[A-Za-z]{3,9})\.?"
# "Mar 5" / "Mar 5, 2023" and "18 Mar" / "18 Mar 2023"
_NAMED_MD = rf"{_MONTH} (?P<md>\d{{1,2}})(?:, (?P<my>\d{{4}}))?"
_NAMED_DM = rf"(?P<md>\d{{1,2}}) {_MONTH}(?: (?P<my>\d{{4}}))?"
_BETWEEN = r"(?:,\s*|\s+klo\s+|\s+)"  # "31/12/23, 21:41", "13.6.2018 klo 21.25"

LAYOUTS: dict[str, re.Pattern[str]] = {
    # Android: "12/31/23, 9:41 PM - Alice: hi"
    "android": re.compile(rf"^{_NUMERIC}{_BETWEEN}{_TIME}\s[-\u2013]\s(?P<rest>.*)$", re.S),
    # iOS: "[31/12/2023, 21:41:05] Alice: hi"
    "ios": re.compile(rf"^\[{_NUMERIC}{_BETWEEN}{_TIME}\]\s(?P<rest>.*)$", re.S),
    # iOS with the time first: "[14:56:01, 3/18/22] Alice: hi"
    "ios-time-first": re.compile(rf"^\[{_TIME},\s*{_NUMERIC}\]\s(?P<rest>.*)$", re.S),
    # Old iOS without brackets: "7/1/16, 4:56:55 PM: Alice: hi"
    "ios-old": re.compile(rf"^{_NUMERIC}{_BETWEEN}{_TIME}:\s(?P<rest>.*)$", re.S),
    # Month names, year often left out: "Mar 5, 8:11 PM - Alice: hi", "18 Mar 12:14 - …"
    "android-month-day": re.compile(
        rf"^{_NAMED_MD}{_BETWEEN}{_TIME}\s[-\u2013]\s(?P<rest>.*)$", re.S | re.I
    ),
    "android-day-month": re.compile(
        rf"^{_NAMED_DM}{_BETWEEN}{_TIME}\s[-\u2013]\s(?P<rest>.*)$", re.S | re.I
    ),
}


def detect_layout(text: str) -> str | None:
    """The layout whose header ``text`` (cleaned) starts with, if any."""
    for name, regex in LAYOUTS.items():
        m = regex.match(text)
        if m and (m.groupdict().get("mon") is None or m.group("mon").lower() in _MONTHS):
            return name
    return None


@dataclass(frozen=True, slots=True)
class Header:
    """A message header as written: date fields not yet put in order."""

    fields: tuple[int, int, int] | None  # numeric dates: (d1, d2, d3) as written
    named: tuple[int, int, int | None] | None  # month names: (month, day, year or None)
    padded: bool  # both day and month fields written with two digits
    separator: str  # "/", ".", "-" or "" for named months
    hour: int
    minute: int
    second: int | None
    pm: bool | None  # None on a 24-hour clock
    rest: str  # what follows the prefix: "Name: text" or a system line

    @property
    def twelve_hour(self) -> bool:
        return self.pm is not None


def parse_header(regex: re.Pattern[str], text: str) -> Header | None:
    """The header of ``text`` (already cleaned) in ``regex``'s layout, or None.

    Raises ValueError for a header whose time cannot exist (minute 61,
    hour 13 PM), naming what is wrong.
    """
    m = regex.match(text)
    if m is None:
        return None
    groups = m.groupdict()
    marker = (groups.get("ampm") or groups.get("pre") or "").lower()
    pm = None if not marker else marker in _PM_SET
    hour, minute = int(m.group("h")), int(m.group("mi"))
    second = int(m.group("s")) if m.group("s") else None
    # Hour 0 with AM/PM exists in real files ("0:24 PM"): it is 12.
    if pm is not None and hour > 12:
        raise ValueError(f"hour {hour} with {marker.upper()}")
    if hour > 23 or minute > 59 or (second or 0) > 59:
        raise ValueError(f"no such time {hour}:{minute:02d}")
    if groups.get("mon") is not None:
        month = _MONTHS.get(m.group("mon").lower())
        if month is None:
            return None
        year = int(m.group("my")) if m.group("my") else None
        named = (month, int(m.group("md")), year)
        return Header(None, named, False, "", hour, minute, second, pm, m.group("rest"))
    d1, d2 = m.group("d1"), m.group("d2")
    fields = (int(d1), int(d2), int(m.group("d3")))
    padded = len(d2) == 2 and (len(d1) == 2 or len(d1) == 4)
    return Header(fields, None, padded, m.group("sep"), hour, minute, second, pm, m.group("rest"))


ORDERS = ("dmy", "mdy", "ymd")


def _year(value: int) -> int:
    if value < 100:
        return 2000 + value
    if value > 2400:  # Buddhist era (Thai phones): 2565 is 2022
        return value - 543
    return value


def date_of(header: Header, order: str, year: int | None = None) -> tuple[int, int, int]:
    """(year, month, day) of ``header`` read in ``order``; ValueError if no such date.

    ``year`` fills in headers written without one (month-name layouts).
    """
    if header.named is not None:
        month, day, written = header.named
        y = written if written is not None else year
        if y is None:
            raise ValueError("the header has no year")
    else:
        d1, d2, d3 = header.fields  # type: ignore[misc]
        if order == "ymd":
            y, month, day = d1, d2, d3
        elif order == "mdy":
            month, day, y = d1, d2, d3
        else:
            day, month, y = d1, d2, d3
        y = _year(y)
    if not 1 <= month <= 12:
        raise ValueError(f"no month {month} in {order}")
    if not 1 <= day <= monthrange(y, month)[1]:
        raise ValueError(f"no day {day} in month {month} of {y}")
    return y, month, day


def timestamp_ms(header: Header, order: str, zone: ZoneInfo, year: int | None = None) -> int:
    """UTC milliseconds of ``header`` read in ``order`` on a phone in ``zone``."""
    y, month, day = date_of(header, order, year)
    hour = header.hour
    if header.pm is not None:
        hour = hour % 12 + (12 if header.pm else 0)
    dt = datetime(y, month, day, hour, header.minute, header.second or 0, tzinfo=zone)
    return int(dt.timestamp()) * 1000


# A jump back in time larger than this counts against an order: real exports
# go back a little (clock changes, messages sent offline), never by a day.
_BACKWARDS_MS = 24 * 3600 * 1000


@dataclass(slots=True)
class _Reading:
    """How the file reads in one order: possible, how often it goes back, its span."""

    possible: bool = True
    first_line: int | None = None  # the first line this order cannot read
    backwards: int = 0
    first: int | None = None
    last: int | None = None


@dataclass(slots=True)
class OrderEvidence:
    """What the headers of one file say about their date order, gathered line by line.

    Memory is constant: per candidate order, a few counters.
    """

    readings: dict[str, _Reading] = field(
        default_factory=lambda: {order: _Reading() for order in ORDERS}
    )
    headers: int = 0
    twelve_hour_unpadded: int = 0
    dotted: int = 0
    four_digit_first: int = 0

    def add(self, header: Header, line: int) -> None:
        if header.fields is None:
            return
        self.headers += 1
        if header.twelve_hour and not header.padded:
            self.twelve_hour_unpadded += 1
        if header.separator == ".":
            self.dotted += 1
        if header.fields[0] > 999:
            self.four_digit_first += 1
        zone = ZoneInfo("UTC")  # only the order of readings matters here
        for order, reading in self.readings.items():
            if not reading.possible:
                continue
            if order == "ymd" and header.fields[0] < 1000:
                reading.possible, reading.first_line = False, line
                continue
            try:
                ts = timestamp_ms(header, order, zone)
            except ValueError:
                reading.possible, reading.first_line = False, line
                continue
            if reading.last is not None and ts < reading.last - _BACKWARDS_MS:
                reading.backwards += 1
            reading.first = ts if reading.first is None else reading.first
            reading.last = ts if reading.last is None else max(reading.last, ts)

    def decide(self) -> Decision:
        """The order to read the file in, and why; ``certain`` False means a guess."""
        if self.headers == 0:  # month names only: the order is in the words
            return Decision("dmy", True, "no numeric dates")
        possible = {o: r for o, r in self.readings.items() if r.possible}
        if not possible:
            lines = {o: r.first_line for o, r in self.readings.items() if o != "ymd"}
            raise ValueError(
                "conflicting dates: "
                + ", ".join(f"line {n} cannot be {o}" for o, n in lines.items())
            )
        if len(possible) == 1:
            (order,) = possible
            return Decision(order, True, "the only order every date fits")
        fewest = min(r.backwards for r in possible.values())
        steady = [o for o, r in possible.items() if r.backwards == fewest]
        if len(steady) == 1:
            return Decision(steady[0], True, "the only order in which time never goes back")
        if self.dotted and "dmy" in steady:
            return Decision("dmy", False, "dates written with dots are day-first")
        if self.twelve_hour_unpadded and "mdy" in steady:
            return Decision("mdy", False, "a 12-hour clock with unpadded dates is month-first")
        spans = {o: (possible[o].last or 0) - (possible[o].first or 0) for o in steady}
        shortest = min(spans.values())
        short = [o for o in steady if spans[o] == shortest]
        if len(short) == 1 and self.headers > 1:
            return Decision(short[0], False, "the order that keeps the messages closest in time")
        order = "dmy" if "dmy" in steady else steady[0]
        return Decision(order, False, "no date says otherwise; day-first is the most common")


def evidence_of(
    regex: re.Pattern[str], lines: Iterable[tuple[int, bytes | None]]
) -> OrderEvidence:
    """The date-order evidence of raw ``(number, line)`` pairs in ``regex``'s layout."""
    evidence = OrderEvidence()
    for number, raw in lines:
        if raw is None:
            continue
        try:
            header = parse_header(regex, clean(raw.decode("utf-8", "replace")).rstrip("\r\n"))
        except ValueError:
            continue
        if header is not None:
            evidence.add(header, number)
    return evidence


@dataclass(frozen=True, slots=True)
class Decision:
    order: str
    certain: bool
    reason: str
