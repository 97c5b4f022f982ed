"""Streaming JSON for importers: memory bounded by one entry, whatever the file.

Day files and message lists are read entry by entry (ijson), never loaded
whole: a 200 MB day file in a 700 KB zip would otherwise cost gigabytes.
Entries nested deeper than :data:`~connectors.sources.shape.MAX_DEPTH` are
skipped while parsing (never built, never recursed into), and a file is read
only up to a byte cap (:class:`Capped`), so one endless string in a
decompression bomb ends that file with a reason instead of the importer.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from typing import IO, Any

import ijson

from connectors.sources.shape import MAX_DEPTH, mismatch

# ijson.parse builds every prefix in full (O(depth) each, O(depth^2) in all);
# callers only look at the top few levels.
PREFIX_PARTS = 6


class TooLarge(ValueError):
    """A file holds more bytes than its cap allows."""


class InvalidJSON(ValueError):
    """The bytes are not JSON (ijson's own error is not a ValueError)."""


class Skipped:
    """Stands for an entry that is not read, with the reason why.

    ``entry`` is what was built of it, when it could be built (for naming it).
    """

    def __init__(self, reason: str, entry: Any = None) -> None:
        self.reason, self.entry = reason, entry

    def __repr__(self) -> str:
        return f"<{self.reason}>"


def why_not(entry: Any, shape: dict[str, Any]) -> str | None:
    """Why an entry from :class:`Entries` is not read: skipped, or not of ``shape``."""
    return entry.reason if isinstance(entry, Skipped) else mismatch(entry, shape)


TOO_DEEP = Skipped(f"entry nests deeper than {MAX_DEPTH} levels: not read")
NOT_TEXT = (
    "entry holds bytes that are not UTF-8, a lone UTF-16 surrogate escape"
    " (\\ud800-\\udfff without its pair) or U+FFFF, which are no text: not read"
)

# What a lone surrogate escape, or a byte that is not UTF-8, becomes before the
# parser sees it: yajl would read a lone high surrogate as "?", and fail the
# whole file on a lone low one or on a bad byte. U+FFFF is a noncharacter, so
# an entry holding it is refused as a whole and its neighbours still read.
LONE_MARK = rb"\uffff"
_SURROGATE = re.compile(rb"(\\+)u[dD]([89abAB]|[c-fC-F])[0-9a-fA-F]{2}")
_HIGH = frozenset(b"89abAB")
_NOT_UTF8 = "backflow.not-utf8"


def _mark_not_utf8(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    return LONE_MARK.decode(), exc.end


codecs.register_error(_NOT_UTF8, _mark_not_utf8)


class TextGuard:
    """A binary reader that replaces what is no text with ``\\uffff``.

    Bytes that are not UTF-8 go first (an incremental decoder keeps a
    character cut by the read). Then lone surrogate escapes: a backslash run
    of odd length before ``u`` is an escape (JSON has no backslash outside
    strings); a tail that could still be, or pair with, an escape cut by the
    read waits for the next one.
    """

    def __init__(self, handle: Any) -> None:
        self.handle, self.pending, self.eof = handle, b"", False
        self.utf8 = codecs.getincrementaldecoder("utf-8")(_NOT_UTF8)

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        while True:
            data = self.handle.read(size)
            self.eof = not data
            if not (data.isascii() and not self.utf8.getstate()[0]):
                data = self.utf8.decode(data, final=self.eof).encode()
            buf = self.pending + data
            cut = len(buf) if self.eof else _safe_cut(buf)
            self.pending = buf[cut:]
            out = _mark_lone(buf, cut)
            if out or self.eof:
                return out


def _run_start(buf: bytes, i: int) -> int:
    while i > 0 and buf[i - 1] == 0x5C:
        i -= 1
    return i


def _safe_cut(buf: bytes) -> int:
    """Where to stop emitting so no escape, or pair of escapes, is cut."""
    cut = len(buf)
    last = buf.rfind(b"\\", max(0, cut - 12))
    if last >= 0:
        cut = _run_start(buf, last)
    # A high surrogate just before the cut pairs with what follows it.
    head = buf[max(0, cut - 6) : cut]
    if len(head) == 6 and head[:3].lower() == b"\\ud" and head[3] in _HIGH:
        cut = _run_start(buf, cut - 6)
    return cut


def _mark_lone(buf: bytes, cut: int) -> bytes:
    """``buf[:cut]`` with each lone surrogate escape replaced; pairs may look past ``cut``."""
    found = [m for m in _SURROGATE.finditer(buf) if len(m.group(1)) % 2 and m.start() < cut]
    if not found:
        return buf[:cut]
    lone: list[int] = []  # start of each lone escape's "\\u"
    i = 0
    while i < len(found):
        m = found[i]
        at = m.end() - 6
        nxt = found[i + 1] if i + 1 < len(found) else _SURROGATE.match(buf, m.end())
        if m.group(2)[0] in _HIGH:
            if (
                nxt is not None
                and nxt.start() == m.end()
                and len(nxt.group(1)) == 1
                and nxt.group(2)[0] not in _HIGH
            ):
                i += 2
                continue
        lone.append(at)
        i += 1
    out = bytearray(buf[:cut])
    for at in lone:
        out[at : at + 6] = LONE_MARK
    return bytes(out)


class Capped:
    """A binary reader that raises TooLarge once more than ``limit`` bytes were read."""

    def __init__(self, handle: IO[bytes], limit: int, name: str) -> None:
        self.handle, self.limit, self.name, self.count = handle, limit, name, 0

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""  # ijson probes with read(0) for bytes or text
        want = self.limit + 1 - self.count if size < 0 else min(size, self.limit + 1 - self.count)
        data = self.handle.read(max(want, 1))
        self.count += len(data)
        if self.count > self.limit:
            raise TooLarge(f"{self.name} is larger than {self.limit} bytes: rest not read")
        return data


# No single JSON string (or number) of an export needs more: one longer is a
# bomb or damage, and ijson would build it whole in memory.
MAX_TOKEN_BYTES = 16 * 1024 * 1024


class TokenCapped:
    """A binary reader that raises TooLarge when a run of bytes without ``"`` exceeds ``limit``.

    A JSON string cannot hold an unescaped quote, so such a run is one token
    being built whole by the parser: a file of any size streams, a file with
    one endless string stops at ``limit`` bytes instead of filling memory.
    """

    def __init__(self, handle: IO[bytes], name: str, limit: int | None = None) -> None:
        self.handle, self.name, self.run = handle, name, 0
        self.limit = MAX_TOKEN_BYTES if limit is None else limit

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size if 0 <= size <= 1 << 20 else 1 << 20)
        quote = data.rfind(b'"')
        self.run = self.run + len(data) if quote < 0 else len(data) - quote - 1
        if self.run > self.limit:
            raise TooLarge(f"{self.name} holds a value over {self.limit} bytes: rest not read")
        return data


def events(handle: Any) -> Iterator[tuple[str | None, str, Any]]:
    """ijson.parse's (prefix, event, value); the prefix is None below PREFIX_PARTS levels."""
    path: list[Any] = []
    try:
        for event, value in ijson.basic_parse(TextGuard(handle), use_float=True):
            yield _with_prefix(path, event, value)
    except ijson.JSONError as exc:  # not a ValueError: callers catch one kind
        raise InvalidJSON(f"invalid JSON: {exc}") from None


def _with_prefix(path: list[Any], event: str, value: Any) -> tuple[str | None, str, Any]:
    near = len(path) <= PREFIX_PARTS
    if event == "map_key":
        prefix = ".".join(path[:-1]) if near else None
        path[-1] = value
    elif event == "start_map":
        prefix = ".".join(path) if near else None
        path.append(None)
    elif event == "start_array":
        prefix = ".".join(path) if near else None
        path.append("item")
    elif event in ("end_map", "end_array"):
        path.pop()
        prefix = ".".join(path) if len(path) <= PREFIX_PARTS else None
    else:
        prefix = ".".join(path) if near else None
    return prefix, event, value


class Entries:
    """Builds entries from parse events; one that cannot be built becomes a Skipped.

    TOO_DEEP when it nests deeper than MAX_DEPTH; one with the NOT_TEXT reason
    when a string in it held a lone surrogate escape (see :class:`TextGuard`).
    """

    def __init__(self) -> None:
        self.builder: ijson.ObjectBuilder | None = None
        self.depth = 0
        self.not_text = False

    @property
    def building(self) -> bool:
        return self.depth > 0

    def start(self, event: str, value: Any) -> None:
        self.builder = ijson.ObjectBuilder()
        self.builder.event(event, value)
        self.depth = 1
        self.not_text = False

    def feed(self, event: str, value: Any) -> tuple[bool, Any]:
        """(done, entry) after one more event of the entry being built."""
        if event in ("start_map", "start_array"):
            self.depth += 1
        elif event in ("end_map", "end_array"):
            self.depth -= 1
        elif event in ("string", "map_key") and "\uffff" in value:
            self.not_text = True  # built on, so that the refusal can name it
        if self.builder is not None:
            self.builder.event(event, value)
            if self.depth > MAX_DEPTH:
                self.builder = None  # skip the rest: never built, never recursed
        if self.depth:
            return False, None
        entry = self.builder.value if self.builder is not None else TOO_DEEP
        self.builder = None
        if self.not_text and entry is not TOO_DEEP:
            return True, Skipped(NOT_TEXT, entry)
        return True, entry


def array_items(handle: Any) -> Iterator[Any]:
    """The items of a top-level JSON array, one at a time (a Skipped for skipped ones).

    Raises ValueError when the document is not an array or is not JSON
    (ijson.JSONError is a ValueError); items before the damage were yielded.
    """
    entries = Entries()
    top = True
    for _prefix, event, value in events(handle):
        if top:
            if event != "start_array":
                raise ValueError("not a JSON array")
            top = False
            continue
        if entries.building:
            done, entry = entries.feed(event, value)
            if done:
                yield entry
        elif event in ("start_map", "start_array"):
            entries.start(event, value)
        elif event == "end_array":
            return
        else:
            yield value  # a scalar item
