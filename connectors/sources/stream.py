"""Streaming JSON for importers: memory bounded by one entry, whatever the file.

Day files and message lists are read entry by entry (ijson), never loaded
whole: a 200 MB day file in a 700 KB zip would otherwise cost gigabytes.
Entries nested deeper than :data:`~connectors.sources.shape.MAX_DEPTH` are
skipped while parsing (never built, never recursed into), and a file is read
only up to a byte cap (:class:`Capped`), so one endless string in a
decompression bomb ends that file with a reason instead of the importer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import ijson

from connectors.sources.shape import MAX_DEPTH

# ijson.parse builds every prefix in full (O(depth) each, O(depth^2) in all);
# callers only look at the top few levels.
PREFIX_PARTS = 6


class TooLarge(ValueError):
    """A file holds more bytes than its cap allows."""


class InvalidJSON(ValueError):
    """The bytes are not JSON (ijson's own error is not a ValueError)."""


class TooDeep:
    """Stands for an entry skipped because it nests deeper than MAX_DEPTH."""

    def __repr__(self) -> str:
        return f"<entry nested deeper than {MAX_DEPTH} levels>"


TOO_DEEP = TooDeep()


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
        for event, value in ijson.basic_parse(handle, use_float=True):
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
    """Builds entries from parse events; one that nests too deep becomes TOO_DEEP."""

    def __init__(self) -> None:
        self.builder: ijson.ObjectBuilder | None = None
        self.depth = 0

    @property
    def building(self) -> bool:
        return self.depth > 0

    def start(self, event: str, value: Any) -> None:
        self.builder = ijson.ObjectBuilder()
        self.builder.event(event, value)
        self.depth = 1

    def feed(self, event: str, value: Any) -> tuple[bool, Any]:
        """(done, entry) after one more event of the entry being built."""
        if event in ("start_map", "start_array"):
            self.depth += 1
        elif event in ("end_map", "end_array"):
            self.depth -= 1
        if self.builder is not None:
            self.builder.event(event, value)
            if self.depth > MAX_DEPTH:
                self.builder = None  # skip the rest: never built, never recursed
        if self.depth:
            return False, None
        entry = self.builder.value if self.builder is not None else TOO_DEEP
        self.builder = None
        return True, entry


def array_items(handle: Any) -> Iterator[Any]:
    """The items of a top-level JSON array, one at a time (TOO_DEEP for skipped ones).

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
