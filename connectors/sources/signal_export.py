"""Signal Android's plaintext export: ``signal-export-<time>/`` (``main.jsonl``, ``files/``).

``main.jsonl`` is libsignal's JSON exporter output: line 1 the BackupInfo,
then one Frame per line. It is read line by line (a line over the cap is
rejected unread) and mapped by :mod:`connectors.sources.signal_frames`.
Attachments are looked up under ``files/`` by the names a FilePointer can
give (how the export names them is unverified, so several are tried), only
inside the export folder, read up to 512 KiB; anything else is a notice.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from connectors.source import Rejected, Source, SourceError, SourceItem, read_lines
from connectors.sources.scope import ExportFolder, OutsideExport, read_bounded
from connectors.sources.shape import too_deep
from connectors.sources.signal_frames import FrameMapper, as_bytes, as_int
from connectors.sources.signal_ids import NETWORK, aci_text
from topics.records import Content

MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_INLINE_BYTES = 512 * 1024
MEDIA_TYPES = ("image", "video", "audio")


def own_aci(options: dict[str, str]) -> str | None:
    """Option ``self_aci`` as a lowercase UUID; SourceError naming it when malformed."""
    raw = options.get("self_aci")
    if raw is None or raw == "":
        return None
    aci = aci_text(raw)
    if aci is None:
        raise SourceError(f"option self_aci: {raw!r} is not a UUID (your Signal ACI)")
    return aci


def file_names(pointer: dict[str, Any]) -> list[str]:
    """Names an attachment may have under ``files/``, most specific first."""
    locator = pointer.get("locatorInfo") if isinstance(pointer.get("locatorInfo"), dict) else {}
    digest = as_bytes(locator.get("plaintextHash")) or b""
    names = []
    for key_field in ("localKey", "key"):
        key = as_bytes(locator.get(key_field))
        if digest and key:
            names.append(hashlib.sha256(digest + key).hexdigest())
            names.append((digest + key).hex())
    if digest:
        names.append(digest.hex())
    for extra in ("mediaName", "fileName"):
        if isinstance(pointer.get(extra), str) and pointer[extra]:
            names.append(pointer[extra])
    return names


class SignalExportSource(Source):
    name = "signal-export"
    network = NETWORK
    description = "Signal Android plaintext export folder (metadata.json, main.jsonl, files/)"

    def read(self) -> Iterator[SourceItem]:
        folder = self.path if self.path.is_dir() else self.path.parent
        main = folder / "main.jsonl"
        if not main.is_file():
            raise SourceError(f"{main}: no such file (expected a Signal export folder)")
        self.folder = ExportFolder(folder)
        self.stats = Counter()
        for key in ("messages", "media", "media_missing", "reactions", "edits", "skipped"):
            self.stats[key] = 0
        mapper = FrameMapper(own_aci(self.options), self._attach, self.stats, self.warn)
        with main.open("rb") as handle:
            self.track(handle, main.stat().st_size)
            for number, raw in read_lines(handle, MAX_LINE_BYTES):
                where = f"main.jsonl:{number}"
                if raw is None:
                    yield Rejected(where, f"line over {MAX_LINE_BYTES} bytes: not read")
                    continue
                if not raw.strip():
                    continue
                try:
                    frame = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    if number == 1:
                        raise SourceError(
                            f"{where}: not JSON ({exc}): not a Signal export"
                        ) from None
                    yield Rejected(where, f"invalid JSON: {exc}", raw)
                    continue
                if number == 1:
                    self._backup_info(frame, where)
                    continue
                if not isinstance(frame, dict) or too_deep(frame):
                    yield Rejected(where, "frame is not an object of at most 32 levels", raw)
                    continue
                self.at = where
                yield from mapper.frame(frame, where)
        if not mapper.chats:
            raise SourceError(f"{main}: no chats found")

    def _backup_info(self, info: Any, where: str) -> None:
        if not isinstance(info, dict) or as_int(info.get("version")) is None:
            raise SourceError(f"{where}: the first line is not a BackupInfo: not a Signal export")
        if as_int(info["version"]) != 1:
            self.warn(f"main.jsonl: backup version {info['version']} (only 1 is known)")

    def _locate(self, pointer: dict[str, Any]) -> Path | None:
        files = self.folder.root / "files"
        for name in file_names(pointer):
            if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
                continue  # a name from the export never picks its own folder
            for folder in (files / name[:2], files):
                try:
                    exact = self.folder.locate(folder.relative_to(self.folder.root) / name)
                except OutsideExport:
                    continue
                if exact is not None:
                    return exact
                found = self._with_extension(folder, name)
                if found is not None:
                    return found
        return None

    def _with_extension(self, folder: Path, name: str) -> Path | None:
        """``name.<ext>`` in ``folder`` (the export adds the extension of the type)."""
        try:
            if not folder.resolve().is_relative_to(self.folder.root):
                return None  # a linked folder: not even its names are read
        except OSError:
            return None
        try:
            entries = os.scandir(folder)
        except OSError:
            return None
        with entries:
            for entry in entries:
                if entry.name.startswith(name + "."):
                    path = Path(entry.path)
                    if self.folder.contains(path):
                        return path.resolve()
        return None

    def _attach(self, pointer: dict[str, Any], where: str) -> Content:
        ctype = pointer.get("contentType") if isinstance(pointer.get("contentType"), str) else None
        label = pointer.get("fileName") if isinstance(pointer.get("fileName"), str) else None
        label = label or "attachment"
        try:
            path = self._locate(pointer)
        except OutsideExport:
            path = None
        if path is None:
            self.stats["media_missing"] += 1
            what = f"{label} ({ctype})" if ctype else label
            return Content(kind="notice", body=f"{what}: file not in the export")
        size, data = read_bounded(path, MAX_INLINE_BYTES)
        if data is None:
            self.stats["media_too_large"] += 1
            return Content(
                kind="notice",
                body=f"{label} ({size} bytes, too large to import; limit {MAX_INLINE_BYTES})",
            )
        self.stats["media"] += 1
        return attachment_content(pointer, label, ctype or mimetypes.guess_type(path.name)[0], data)


def attachment_content(
    pointer: dict[str, Any], label: str, ctype: str | None, data: bytes
) -> Content:
    """A Signal attachment's bytes as media content (caption, name, dimensions from its
    pointer), the same for the export and the v2 backup."""
    major = (ctype or "").split("/", 1)[0]
    return Content(
        kind="media",
        media_type=major if major in MEDIA_TYPES else "file",
        body=pointer.get("caption") or label,
        filename=label,
        mimetype=ctype,
        size=len(data),
        data=base64.b64encode(data).decode("ascii"),
        width=as_int(pointer.get("width")) or None,
        height=as_int(pointer.get("height")) or None,
    )
