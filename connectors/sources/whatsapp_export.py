"""Reading a WhatsApp export: the chat text and its media, from a .txt or a .zip.

The parser (connectors/sources/whatsapp.py) only sees lines and named media;
this module decides what may be opened: zip entries whose names could escape
a directory are refused, media beside a .txt export must lie in its folder
(no links out of it), and media are read in memory (never extracted to disk)
and only up to MAX_INLINE_BYTES, counted on the bytes read.
"""

from __future__ import annotations

import itertools
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path, PurePosixPath
from typing import IO

from connectors.source import SourceError, read_lines
from connectors.sources.scope import (
    ZIP_DAMAGE,
    ExportFolder,
    UnreadableEntry,
    check_entry,
    read_bounded,
)

# Inline media up to this size; bigger files would not fit a Kafka record.
MAX_INLINE_BYTES = 512 * 1024
# WhatsApp caps a message at 65,536 characters (up to 4 bytes each): a longer
# line is not a real message, and reading it whole could cost any amount.
MAX_LINE_BYTES = 256 * 1024

_TITLE = re.compile(r"^WhatsApp Chat (?:with|-|\u2013) (?P<name>.+?)(?: \(\d+\))?$")


def safe_member_name(name: str) -> bool:
    """A zip entry or referenced file name that cannot escape a directory."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in re.split(r"[/\\]", name)


class ChatExport:
    """The chat text and its media, from a .txt (media beside it) or a .zip."""

    def __init__(self, path: Path, track: Callable[[IO[bytes], int], None]) -> None:
        self.path = path
        self.track = track  # Source.track: the progress bar follows our reading
        self.zip: zipfile.ZipFile | None = None
        self.entries: dict[str, zipfile.ZipInfo] = {}
        self.refused: list[str] = []
        self.chat_name = path.name
        if not path.exists():
            raise SourceError(f"{path}: no such file")
        if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
            self._open_zip()
        elif path.is_dir():
            raise SourceError(f"{path}: expected a WhatsApp .txt or .zip export, got a directory")
        self.title = self._title()

    def _open_zip(self) -> None:
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SourceError(f"{self.path.name}: not a readable zip ({exc})") from None
        if self.zip.fp is not None:
            self.track(self.zip.fp, self.path.stat().st_size)
        chats: list[str] = []
        for info in self.zip.infolist():
            if info.is_dir():
                continue
            if not safe_member_name(info.filename):
                self.refused.append(info.filename)
                continue
            base = PurePosixPath(info.filename.replace("\\", "/")).name
            self.entries.setdefault(base, info)
            if base.lower().endswith(".txt"):
                chats.append(info.filename)
        preferred = [
            c
            for c in chats
            if PurePosixPath(c).name == "_chat.txt"
            or PurePosixPath(c).name.startswith("WhatsApp Chat")
        ]
        picked = preferred or chats
        if len(picked) != 1:
            found = ", ".join(picked) or "none"
            raise SourceError(
                f"{self.path.name}: expected one chat text file (_chat.txt or "
                f"'WhatsApp Chat with ….txt') in the zip, found: {found}"
            )
        self.chat_name = picked[0]

    def _title(self) -> str | None:
        """The chat's title from the names WhatsApp gives an export, if one has it.

        "WhatsApp Chat with Alice.txt", "WhatsApp Chat - Family.zip", or the
        folder an iOS ``_chat.txt`` was unzipped into.
        """
        chat = PurePosixPath(self.chat_name)
        candidates = [chat.stem, *(p.name for p in chat.parents if p.name), self.path.stem]
        if self.zip is None:
            candidates.append(self.path.parent.name)
        for candidate in candidates:
            m = _TITLE.match(candidate)
            if m:
                return m.group("name")
        stem = chat.stem
        return None if stem == "_chat" else stem

    @property
    def fallback_name(self) -> str:
        """A stand-in for a title: the zip's name or the folder a ``_chat.txt`` is in."""
        if self.zip is not None:
            return self.path.stem
        return self.path.parent.name or self.path.stem

    def written(self) -> date:
        """When the export was made: the chat file's date in the zip, else its mtime."""
        if self.zip is not None:
            y, m, d = self.zip.getinfo(self.chat_name).date_time[:3]
            return date(y, m, d)
        return datetime.fromtimestamp(self.path.stat().st_mtime).date()

    @contextmanager
    def lines(self) -> Iterator[Iterator[tuple[int, bytes | None]]]:
        """(line number, raw line or None when over MAX_LINE_BYTES), streamed.

        Zip damage becomes one SourceError; memory stays bounded by the line cap.
        """
        handle: IO[bytes]
        try:
            if self.zip is not None:
                handle = self.zip.open(check_entry(self.zip.getinfo(self.chat_name)))
            else:
                handle = self.path.open("rb")
        except (UnreadableEntry, *ZIP_DAMAGE) as exc:
            raise SourceError(f"{self.path.name}: cannot read {self.chat_name}: {exc}") from None
        if self.zip is None:
            self.track(handle, self.path.stat().st_size)
        with handle:
            yield self._guarded(handle)

    def _guarded(self, handle: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
        try:
            yield from read_lines(handle, MAX_LINE_BYTES)
        except ZIP_DAMAGE as exc:
            raise SourceError(f"{self.path.name}: damaged archive ({exc})") from None

    def media(self, name: str) -> tuple[int, bytes | None] | None:
        """(size, bytes or None when too large), or None when the file is not in the export.

        Raises OutsideExport when ``name`` leads outside the export's folder,
        UnreadableEntry for a zip entry that cannot be read.
        """
        if not safe_member_name(name) or "/" in name or "\\" in name:
            return None
        if self.zip is not None:
            info = self.entries.get(name)
            if info is None:
                return None
            if info.file_size > MAX_INLINE_BYTES:
                return info.file_size, None
            try:
                return info.file_size, self.zip.read(check_entry(info))
            except ZIP_DAMAGE as exc:
                raise SourceError(
                    f"{self.path.name}: damaged archive entry {name}: {exc}"
                ) from None
        # A .txt export: media lie beside it, and only there (OutsideExport
        # for a name or link that leads elsewhere).
        beside = ExportFolder(self.path.parent).locate(name)
        if beside is None:
            return None
        return read_bounded(beside, MAX_INLINE_BYTES)

    def siblings(
        self, files: int, lines: int
    ) -> Iterator[Iterator[tuple[int, bytes | None]]]:
        """The first ``lines`` raw lines of up to ``files`` other chat ``.txt`` beside this one.

        Only for a ``.txt`` export, and only its own folder (the import's scope,
        as for its media); links out of the folder are never followed.
        """
        if self.zip is not None:
            return
        folder = ExportFolder(self.path.parent)
        found = sorted(p for p in self.path.parent.glob("*.txt") if p != self.path)
        for path in found[:files]:
            if not folder.contains(path):
                continue
            try:
                with path.open("rb") as handle:
                    yield itertools.takewhile(
                        lambda pair: pair[0] <= lines, read_lines(handle, MAX_LINE_BYTES)
                    )
            except OSError:
                continue

    def has_media(self, name: str) -> bool:
        """Whether ``name`` is a file of this export (without reading it)."""
        if not safe_member_name(name) or "/" in name or "\\" in name:
            return False
        if self.zip is not None:
            return name in self.entries
        try:
            return ExportFolder(self.path.parent).locate(name) is not None
        except ValueError:  # OutsideExport: not ours
            return False

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()
