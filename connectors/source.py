"""The source connector contract.

A source connector is mostly a parser: it reads some network's data and
yields canonical records (``PortalInfo`` and ``NetworkMessage`` from
``topics.records``) or ``Rejected`` items for input it could not make sense
of. The framework (``connectors.publish``) does the rest: validation with the
one codec, keying by portal, batching, publishing, per-portal
``history_complete`` markers, progress and dead letters.

Connectors are registered under the entry-point group ``backflow.connectors``
(name = the format in ``backflow import FORMAT PATH``), so a third-party
package shows up in ``backflow import --list`` without touching backflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import IO, ClassVar

from topics.records import NetworkMessage, PortalInfo

ENTRY_POINT_GROUP = "backflow.connectors"


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input a connector could not turn into a record: it goes to dead letters."""

    where: str  # "file.txt:12", "channel/2024-01-01.json[3]" ...
    reason: str
    original: str | bytes = ""  # what was read, as read (bounded in the dead letter)
    key: str | None = None  # the portal key ("network:portal") when the input names one


SourceItem = PortalInfo | NetworkMessage | Rejected


class SourceError(Exception):
    """The whole input is unusable (missing file, corrupt archive): one clear line."""


class Source:
    """Base class for source connectors.

    Subclasses set ``name`` and ``description`` and implement ``read``. The
    constructor takes the input path and ``options`` from ``--option k=v``.
    ``read`` must stream: never load the whole input into memory.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    network: ClassVar[str] = ""
    # True when read() yields records made by topics.codec.decode (JSONL):
    # they passed the codec's validation, so the framework does not repeat it.
    decoded: ClassVar[bool] = False
    # True when PATH may also be a database URL (``postgresql://…``): the CLI then
    # passes it as given instead of checking for a file.
    accepts_url: ClassVar[bool] = False
    # "module:function" of the coroutine ``backflow import FORMAT PATH --follow``
    # runs, called (location, options, settings, echo). A name, not a method, so
    # the follow loop (which reads through this source) is imported only to run.
    follower: ClassVar[str | None] = None

    def __init__(self, path: Path, options: dict[str, str] | None = None) -> None:
        # (With accepts_url, a connector's own __init__ takes the URL as a str.)
        self.path = Path(path)
        self.options = dict(options or {})
        # Filled by read() for the final summary: e.g. {"media": 3}.
        self.stats: dict[str, int] = {}
        # Filled by read(): what the operator should know but is not an error,
        # e.g. "the date order is a guess; pass -o date_order=…". Shown once each.
        self.warnings: list[str] = []
        # Where the message being yielded was read ("chat.txt:12"): a connector
        # sets it before yielding, so a record the framework refuses is named
        # by file and line, not by its position in the stream.
        self.at: str | None = None
        self._tracked: tuple[IO[bytes], int] | None = None

    def read(self) -> Iterator[SourceItem]:
        raise NotImplementedError

    def warn(self, message: str) -> None:
        """Tell the operator something about the whole input (one line, named option)."""
        if message not in self.warnings:
            self.warnings.append(message)

    def track(self, handle: IO[bytes], total: int) -> None:
        """Let the progress bar follow ``handle``'s read position out of ``total`` bytes.

        Optional: a source that calls it gets a percentage and an estimate,
        one that does not still gets counts and a rate.
        """
        self._tracked = (handle, total)

    def progress(self) -> tuple[int, int] | None:
        """(bytes read, bytes in all) of the tracked input, if any."""
        if self._tracked is None:
            return None
        handle, total = self._tracked
        try:
            return min(handle.tell(), total), total
        except (OSError, ValueError):  # closed, or not seekable
            return None


class LongLine(bytes):
    """The start of a line over the limit (its first ``LONG_LINE_HEAD`` bytes); the rest
    was skipped. Enough for a dead letter's excerpt."""


LONG_LINE_HEAD = 16 * 1024


def read_lines(
    handle: IO[bytes], limit: int, *, heads: bool = False
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for each line of ``handle``; None for a line over ``limit`` bytes
    (with ``heads``: a ``LongLine`` holding its start instead).

    Memory stays bounded by ``limit`` whatever the input: the rest of an
    over-long line is skipped in chunks, never held whole.
    """
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if len(line) <= limit:
            yield number, line
            continue
        head = LongLine(line[:LONG_LINE_HEAD]) if heads else None
        while not line.endswith(b"\n"):
            line = handle.readline(64 * 1024)
            if not line:
                break
        yield number, head


class BoundedLines:
    """A text file's lines for a line-based parser (``csv``), none held beyond ``limit``.

    A line over ``limit`` characters is handed on as an empty line (which
    csv skips) and its number is noted in ``skipped`` for the connector to
    reject; the rest of it is skipped in chunks, never held whole.
    """

    def __init__(self, handle: IO[str], limit: int) -> None:
        self.handle, self.limit, self.number = handle, limit, 0
        self.skipped: list[int] = []

    def __iter__(self) -> BoundedLines:
        return self

    def __next__(self) -> str:
        line = self.handle.readline(self.limit + 1)
        if not line:
            raise StopIteration
        self.number += 1
        if len(line) <= self.limit or line.endswith("\n"):
            return line
        while line and not line.endswith("\n"):
            line = self.handle.readline(64 * 1024)
        self.skipped.append(self.number)
        return "\n"


def available() -> dict[str, type[Source]]:
    """Every installed connector by format name (built-ins come via entry points too)."""
    found: dict[str, type[Source]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load()
    return dict(sorted(found.items()))
