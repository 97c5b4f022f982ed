"""What an import may read: the files inside its export folder, and no others.

An export comes from a stranger. A file name in it (an attachment, a day file)
may be absolute, climb out with ``..``, carry a NUL, or be a symbolic link to
anywhere (``/proc/self/environ``, a key file). Every importer that reads files
from a folder asks an :class:`ExportFolder` for them: the resolved path must
stay inside the folder, and reads are bounded by the bytes actually read, not
by ``st_size`` (which is 0 for ``/proc`` files and can change under us).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path, PurePath

# What reading a damaged zip entry may raise (zipfile has no one base class).
ZIP_DAMAGE = (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError)
_READABLE_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)


class UnreadableEntry(ValueError):
    """A zip entry this importer cannot read (encrypted, an unsupported method)."""


class OutsideExport(ValueError):
    """A name that leads out of the export folder (absolute, ``..``, NUL, or a link)."""


class ExportFolder:
    """The folder an import is confined to (resolved once, links included)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def locate(self, name: str | PurePath) -> Path | None:
        """The regular file ``name`` names inside the folder; None when there is none.

        Raises OutsideExport when the name, or a link on the way, leads outside.
        """
        text = str(name)
        if not text or "\0" in text:
            raise OutsideExport(f"{text!r} is not a usable file name")
        relative = PurePath(text.replace("\\", "/"))
        if relative.is_absolute() or relative.drive or ".." in relative.parts:
            raise OutsideExport(f"{text!r} points outside the export folder")
        resolved = (self.root / relative).resolve()
        if not resolved.is_relative_to(self.root):
            raise OutsideExport(f"{text!r} is a link to a file outside the export folder")
        return resolved if resolved.is_file() else None

    def contains(self, path: Path) -> bool:
        """Whether ``path`` (found by walking the folder) really lies inside it."""
        try:
            return path.resolve().is_relative_to(self.root) and path.resolve().is_file()
        except OSError:
            return False


def read_bounded(path: Path, limit: int) -> tuple[int, bytes | None]:
    """(size, bytes) of a file, or (size, None) when it holds more than ``limit`` bytes.

    At most ``limit + 1`` bytes are read, so memory stays bounded whatever the
    file claims to be; the size reported is what was read when that is more
    than the file system said.
    """
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
        if len(data) > limit:
            try:
                claimed = path.stat().st_size
            except OSError:
                claimed = 0
            return max(claimed, len(data)), None
    return len(data), data


def check_entry(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """``info`` when the entry can be read; UnreadableEntry (encrypted, Deflate64 …) if not.

    Asked before opening: zipfile raises RuntimeError or NotImplementedError
    for these, which would otherwise end the whole import.
    """
    if info.flag_bits & 0x1:
        raise UnreadableEntry(f"{info.filename} is an encrypted zip entry (export it unencrypted)")
    if info.compress_type not in _READABLE_METHODS:
        raise UnreadableEntry(
            f"{info.filename} uses zip compression method {info.compress_type}, which Python's "
            "zipfile cannot read (repack the zip with Deflate)"
        )
    return info
