"""Signal Android's on-device backup folder (backup v2): ``SignalBackups/``.

``SignalBackups/signal-backup-<date>/`` holds ``metadata`` (the encrypted
backup id) and ``main``: IV || AES-256-CBC(gzip(varint-delimited Frames)) ||
HMAC-SHA256. The recovery key (64 characters) alone opens it: from option
``recovery_key_file``, ``$SIGNAL_RECOVERY_KEY`` (or the variable option
``recovery_key_env`` names) or the prompt of ``backflow import``, never the
command line, never in an error. The MAC of ``main`` is checked over the
whole file before one byte is decrypted, so a wrong key or a changed file
is one ``SourceError`` before anything is yielded. Then the stream is
decrypted, gunzipped and parsed frame by frame (memory: one frame), and
mapped like the plaintext export. Attachments under ``SignalBackups/files/``
are decrypted as Signal attachments (IV || AES-CBC || HMAC with the 64-byte
local key: the format is unverified); what cannot be read is a notice.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources import protowire as pw
from connectors.sources import signal_crypto as sc
from connectors.sources.scope import ExportFolder, OutsideExport, read_bounded
from connectors.sources.signal_export import MAX_INLINE_BYTES, attachment_content, own_aci
from connectors.sources.signal_frames import FrameMapper, as_bytes, as_int
from connectors.sources.signal_ids import NETWORK
from connectors.sources.signal_proto import BACKUP_INFO, FRAME, decode
from topics.records import Content

KEY_ENV = "SIGNAL_RECOVERY_KEY"
MAX_FRAME_BYTES = 16 * 1024 * 1024
CHUNK = 64 * 1024


class SignalBackupV2Source(Source):
    name = "signal-backup-v2"
    network = NETWORK
    description = "Signal Android on-device backup folder (SignalBackups/, recovery key)"
    secret_prompt: ClassVar[str] = "Signal recovery key (64 characters)"

    def __init__(self, path: Path, options: dict[str, str] | None = None) -> None:
        super().__init__(path, options)
        self.secret: str | None = None

    def needs_secret(self) -> bool:
        env = self.options.get("recovery_key_env", KEY_ENV)
        return not self.options.get("recovery_key_file") and not os.environ.get(env)

    def _recovery_key(self) -> bytes:
        if "recovery_key" in self.options:
            raise SourceError(
                "option recovery_key: refused, a key on the command line shows in ps; "
                f"use -o recovery_key_file=PATH, ${KEY_ENV} or the prompt"
            )
        env = self.options.get("recovery_key_env", KEY_ENV)
        raw = self.secret
        if raw is None and self.options.get("recovery_key_file"):
            name = self.options["recovery_key_file"]
            try:
                _, data = read_bounded(Path(name), 4096)
            except OSError as exc:
                raise SourceError(
                    f"option recovery_key_file: cannot read {name}: {exc.strerror}"
                ) from None
            raw = (data or b"").decode("utf-8", errors="replace")
        raw = raw if raw is not None else os.environ.get(env)
        if not raw:
            raise SourceError(
                f"{self.path.name}: no recovery key: set ${env}, pass "
                "-o recovery_key_file=PATH, or run on a terminal to be asked"
            )
        try:
            return sc.normalize_recovery_key(raw)
        except sc.BackupError as exc:
            raise SourceError(f"{self.path.name}: {exc}") from None

    def _snapshot(self) -> Path:
        """The snapshot folder: PATH itself (or its ``main``), or the newest ``signal-backup-*``."""
        if self.path.name == "main" and self.path.is_file():
            return self.path.parent
        if (self.path / "main").is_file():
            return self.path
        found = sorted(p for p in self.path.glob("signal-backup-*") if (p / "main").is_file())
        if not found:
            raise SourceError(f"{self.path}: no signal-backup-*/main (expected SignalBackups/)")
        return found[-1]

    def read(self) -> Iterator[SourceItem]:
        key = sc.backup_key(self._recovery_key())
        snapshot = self._snapshot()
        # Attachments are shared by snapshots: SignalBackups/files/, never outside it.
        shared = snapshot.parent
        self.files = ExportFolder(shared) if (shared / "files").is_dir() else None
        self_aci = own_aci(self.options)
        backup_id = self._backup_id(snapshot / "metadata", key)
        if self_aci is not None:
            import uuid

            if sc.backup_id(key, uuid.UUID(self_aci).bytes) != backup_id:
                raise SourceError(f"option self_aci: {self_aci} is not this backup's account")
        mac_key, aes_key = sc.message_backup_keys(key, backup_id)
        main = snapshot / "main"
        self.stats = Counter()
        for name in ("messages", "media", "media_missing", "reactions", "edits", "skipped"):
            self.stats[name] = 0
        mapper = FrameMapper(self_aci, self._attach, self.stats, self.warn)
        with main.open("rb") as handle:
            size = main.stat().st_size
            self.track(handle, size)
            _check_mac(handle, size, mac_key)
            handle.seek(0)
            frames = _frames(_plaintext(handle, size, aes_key))
            try:
                info = next(frames, None)
                if info is None or decode(info, BACKUP_INFO).get("version") is None:
                    raise SourceError("main: the stream holds no BackupInfo")
                for number, raw in enumerate(frames, start=2):
                    where = f"main frame {number}"
                    self.at = where
                    try:
                        frame = decode(raw, FRAME)
                    except pw.WireError as exc:
                        yield Rejected(where, f"not a Frame: {exc}", raw[:4000])
                        continue
                    yield from mapper.frame(frame, where)
            except sc.BackupError as exc:
                raise SourceError(f"main: {exc}") from None
        if not mapper.chats:
            raise SourceError(f"{main}: no chats found")

    def _backup_id(self, path: Path, key: bytes) -> bytes:
        try:
            _, data = read_bounded(path, 4096)
        except OSError:
            raise SourceError(f"{path}: cannot read the backup's metadata") from None
        try:
            meta = pw.message(data or b"")
            inner = pw.message(pw.first(meta, 2, b""))  # type: ignore[arg-type]
            iv, encrypted = pw.first(inner, 1), pw.first(inner, 2)
        except (pw.WireError, TypeError):
            iv = encrypted = None
        if not isinstance(iv, bytes) or len(iv) != 12 or not isinstance(encrypted, bytes):
            raise SourceError(f"{path}: not a backup v2 metadata file")
        counter = iv + bytes(4)
        cipher = Cipher(algorithms.AES256(sc.local_metadata_key(key)), modes.CTR(counter))
        return cipher.decryptor().update(encrypted)

    def _attach(self, pointer: dict[str, Any], where: str) -> Content:
        label = pointer.get("fileName") if isinstance(pointer.get("fileName"), str) else None
        label = label or "attachment"
        ctype = pointer.get("contentType") if isinstance(pointer.get("contentType"), str) else None
        locator = pointer.get("locatorInfo") if isinstance(pointer.get("locatorInfo"), dict) else {}
        digest, local = as_bytes(locator.get("plaintextHash")), as_bytes(locator.get("localKey"))
        data = None
        if self.files is not None and digest and local and len(local) == 64:
            name = hashlib.sha256(digest + local).hexdigest()
            try:
                path = self.files.locate(f"files/{name[:2]}/{name}")
            except OutsideExport:
                path = None
            if path is not None:
                _, blob = read_bounded(path, MAX_INLINE_BYTES + 64)
                data = _open_attachment(blob, local, as_int(locator.get("size")))
                if blob is None:
                    self.stats["media_too_large"] += 1
                    return Content(kind="notice", body=f"{label}: too large to import")
        if data is None:
            self.stats["media_missing"] += 1
            what = f"{label} ({ctype})" if ctype else label
            return Content(kind="notice", body=f"{what}: file not readable in the backup")
        self.stats["media"] += 1
        return attachment_content(pointer, label, ctype, data)


def _open_attachment(blob: bytes | None, key: bytes, size: int | None) -> bytes | None:
    """IV || AES-256-CBC || HMAC-SHA256 under the 64-byte local key; None if not that."""
    if blob is None or len(blob) < 16 + 16 + 32:
        return None
    body, theirs = blob[:-32], blob[-32:]
    if not hmac.compare_digest(hmac.new(key[32:], body, hashlib.sha256).digest(), theirs):
        return None
    decryptor = Cipher(algorithms.AES256(key[:32]), modes.CBC(body[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(decryptor.update(body[16:]) + decryptor.finalize())
        plain += unpadder.finalize()
    except ValueError:
        return None
    return plain[:size] if size else plain


def _check_mac(handle: IO[bytes], size: int, mac_key: bytes) -> None:
    if size < 16 + 16 + 32:
        raise SourceError("main: too short to be a backup v2 file; nothing was imported")
    mac = hmac.new(mac_key, digestmod=hashlib.sha256)
    left = size - 32
    while left:
        chunk = handle.read(min(CHUNK, left))
        if not chunk:
            raise SourceError("main: truncated while reading; nothing was imported")
        mac.update(chunk)
        left -= len(chunk)
    if not hmac.compare_digest(mac.digest(), handle.read(32)):
        raise SourceError(
            "main: wrong recovery key, or the file was changed: its MAC does not match; "
            "nothing was imported"
        )


def _plaintext(handle: IO[bytes], size: int, aes_key: bytes) -> Iterator[bytes]:
    """Decrypted, unpadded, gunzipped bytes of ``main`` (already authenticated), in chunks.

    Output is inflated CHUNK bytes at a time, so a decompression bomb costs
    no more memory than a real backup.
    """
    iv = handle.read(16)
    decryptor = Cipher(algorithms.AES256(aes_key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def decrypted() -> Iterator[bytes]:
        left = size - 16 - 32
        while left:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                raise sc.BackupError("truncated while decrypting")
            left -= len(chunk)
            yield unpadder.update(decryptor.update(chunk))
        yield unpadder.update(decryptor.finalize()) + unpadder.finalize()

    try:
        for data in decrypted():
            while data and not inflate.eof:  # after the one gzip member: zero padding
                out = inflate.decompress(data, CHUNK)
                data = inflate.unconsumed_tail
                if out:
                    yield out
    except (ValueError, zlib.error) as exc:
        raise sc.BackupError(f"cannot decrypt or decompress: {exc}") from None
    if not inflate.eof:
        raise sc.BackupError("the compressed stream ends early")


def _frames(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Varint-length-delimited messages from a byte stream; one frame in memory at a time."""
    buffer, pos = bytearray(), 0
    for chunk in chunks:
        del buffer[:pos]  # amortized: a frame larger than a chunk is not copied per chunk
        buffer += chunk
        pos = 0
        while pos < len(buffer):
            try:
                length, start = pw.varint(buffer, pos)
            except pw.WireError:
                if len(buffer) - pos > 10:
                    raise sc.BackupError("a frame length is not a varint") from None
                break  # the varint continues in the next chunk
            if length > MAX_FRAME_BYTES:
                raise sc.BackupError(f"a frame claims {length} bytes (limit {MAX_FRAME_BYTES})")
            if len(buffer) < start + length:
                break
            yield bytes(buffer[start : start + length])
            pos = start + length
    if pos < len(buffer):
        raise sc.BackupError(f"the stream ends inside a frame ({len(buffer) - pos} bytes left)")
