"""Signal's backup cryptography: the legacy ``.backup`` frame stream and the key derivations.

Legacy ``.backup`` (Signal-Android FullBackupBase.java, BackupRecordInputStream.java):
a plaintext header frame (iv, salt, version), then frames each under a fresh
AES-256-CTR counter block, each closed by the first 10 bytes of an
HMAC-SHA256. Every MAC is checked before its bytes are decrypted or used, so
a wrong passphrase fails at the first frame and a tampered frame where it
was changed. Nothing here ever puts the passphrase into an error.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from connectors.sources import protowire

MAC_BYTES = 10
# No frame a phone writes comes near this (a statement holds one row); a
# larger length is damage or hostility, refused before it is read.
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 4096
CHUNK = 64 * 1024


class BackupError(ValueError):
    """The backup cannot be read further (wrong passphrase, damage, truncation)."""


def hkdf(key: bytes, info: bytes, size: int, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=size, salt=salt, info=info).derive(key)


def normalize_passphrase(raw: str) -> bytes:
    """The 30 digits without spaces; BackupError (never showing them) if it is not that."""
    digits = "".join(raw.split())
    if len(digits) != 30 or not digits.isascii() or not digits.isdigit():
        raise BackupError(
            f"the passphrase must be 30 digits (spaces allowed); got {len(digits)} characters"
        )
    return digits.encode("ascii")


def legacy_keys(passphrase: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(cipher key, MAC key): 250,000 rounds of SHA-512, then HKDF ``Backup Export``."""
    digest = hashlib.sha512()
    digest.update(salt)
    value = passphrase
    for _ in range(250_000):
        digest.update(value)
        digest.update(passphrase)
        value = digest.digest()
        digest = hashlib.sha512()
    derived = hkdf(value[:32], b"Backup Export", 64)
    return derived[:32], derived[32:]


# ---------------------------------------------------------------- backup v2 keys


def normalize_recovery_key(raw: str) -> bytes:
    """The 64-character recovery key (AEP): lowercase, no separators, '#'->'o', '='->'0'."""
    key = "".join(c for c in raw.lower() if not c.isspace() and c != "-")
    key = key.replace("#", "o").replace("=", "0")
    if len(key) != 64 or not all(c.isascii() and c.isalnum() for c in key):
        raise BackupError(f"the recovery key must be 64 letters and digits; got {len(key)}")
    return key.encode("ascii")


def backup_key(aep: bytes) -> bytes:
    return hkdf(aep, b"20240801_SIGNAL_BACKUP_KEY", 32)


def backup_id(key: bytes, aci: bytes) -> bytes:
    return hkdf(key, b"20241024_SIGNAL_BACKUP_ID:" + aci, 16)


def message_backup_keys(key: bytes, backup_id_: bytes) -> tuple[bytes, bytes]:
    """(HMAC key, AES key) of a v2 ``main`` file."""
    derived = hkdf(key, b"20241007_SIGNAL_BACKUP_ENCRYPT_MESSAGE_BACKUP:" + backup_id_, 64)
    return derived[:32], derived[32:]


def local_metadata_key(key: bytes) -> bytes:
    return hkdf(key, b"20241011_SIGNAL_LOCAL_BACKUP_METADATA_KEY", 32)


# ---------------------------------------------------------------- legacy frames


@dataclass(frozen=True, slots=True)
class Header:
    iv: bytes
    salt: bytes
    version: int


def _read_exact(handle: IO[bytes], size: int, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        at = handle.tell()
        raise BackupError(f"truncated at byte {at}: {what} needs {size} bytes, {len(data)} left")
    return data


def read_header(handle: IO[bytes]) -> Header:
    size = int.from_bytes(_read_exact(handle, 4, "the header length"), "big")
    if size == 0 or size > MAX_HEADER_BYTES:
        raise BackupError(f"header length {size} is not a Signal backup's")
    frame = _read_exact(handle, size, "the header frame")
    try:
        header = protowire.message(protowire.first(protowire.message(frame), 1, b""))
    except (protowire.WireError, TypeError):
        raise BackupError("the first frame is not a backup header: not a Signal backup") from None
    iv, salt = protowire.first(header, 1), protowire.first(header, 2, b"")
    version = protowire.first(header, 3, 0)
    if not isinstance(iv, bytes) or len(iv) != 16 or not isinstance(salt, bytes):
        raise BackupError("the header has no 16-byte IV: not a Signal backup")
    if not isinstance(version, int) or version > 1:
        raise BackupError(f"backup file version {version} is not supported (0 and 1 are)")
    return Header(iv, salt, version)


class FrameReader:
    """Decrypts and authenticates frames and payloads, in file order."""

    def __init__(self, handle: IO[bytes], header: Header, passphrase: bytes) -> None:
        self.handle = handle
        self.header = header
        self.cipher_key, self.mac_key = legacy_keys(passphrase, header.salt)
        self.counter = int.from_bytes(header.iv[:4], "big")
        self.frames = 0

    def _next_iv(self) -> bytes:
        iv = (self.counter & 0xFFFFFFFF).to_bytes(4, "big") + self.header.iv[4:]
        self.counter += 1
        return iv

    def _decryptor(self, iv: bytes):
        return Cipher(algorithms.AES256(self.cipher_key), modes.CTR(iv)).decryptor()

    def _mac_failed(self) -> BackupError:
        if self.frames == 0:
            return BackupError(
                "wrong passphrase, or not this backup's: the first frame's MAC does not match"
            )
        at = self.handle.tell()
        return BackupError(
            f"frame {self.frames + 1} (before byte {at}) fails its MAC: "
            "the file is damaged or was changed"
        )

    def frame(self) -> bytes:
        """The next frame's plaintext protobuf bytes."""
        raw_length = _read_exact(self.handle, 4, f"frame {self.frames + 1}'s length")
        decryptor = self._decryptor(self._next_iv())
        mac = hmac.new(self.mac_key, digestmod=hashlib.sha256)
        if self.header.version >= 1:
            mac.update(raw_length)
            length = int.from_bytes(decryptor.update(raw_length), "big")
        else:
            length = int.from_bytes(raw_length, "big")
        if length < MAC_BYTES or length > MAX_FRAME_BYTES:
            if self.frames == 0:
                raise self._mac_failed()  # a wrong key decrypts the length to noise
            raise BackupError(
                f"frame {self.frames + 1} claims {length} bytes "
                f"(limit {MAX_FRAME_BYTES}): the file is damaged"
            )
        body = _read_exact(self.handle, length, f"frame {self.frames + 1}")
        ciphertext, theirs = body[:-MAC_BYTES], body[-MAC_BYTES:]
        mac.update(ciphertext)
        if not hmac.compare_digest(mac.digest()[:MAC_BYTES], theirs):
            raise self._mac_failed()
        self.frames += 1
        return decryptor.update(ciphertext) + decryptor.finalize()

    def payload(self, length: int, what: str) -> Iterator[bytes]:
        """The plaintext of the ``length``-byte payload after a frame, in chunks.

        The MAC covers the whole payload and comes after it: a caller must not
        trust the chunks until the iterator finished without BackupError.
        """
        iv = self._next_iv()
        decryptor = self._decryptor(iv)
        mac = hmac.new(self.mac_key, iv, hashlib.sha256)
        left = length
        while left:
            chunk = _read_exact(self.handle, min(CHUNK, left), what)
            left -= len(chunk)
            mac.update(chunk)
            yield decryptor.update(chunk)
        theirs = _read_exact(self.handle, MAC_BYTES, f"the MAC of {what}")
        if not hmac.compare_digest(mac.digest()[:MAC_BYTES], theirs):
            raise BackupError(f"{what} fails its MAC: the file is damaged or was changed")
