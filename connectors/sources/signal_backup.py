"""Signal Android's classic encrypted ``.backup`` file.

The 30-digit passphrase never comes from the command line (``ps`` would show
it): from the file named by option ``passphrase_file``, the environment
variable ``SIGNAL_BACKUP_PASSPHRASE`` (or the one option ``passphrase_env``
names), or the prompt ``backflow import`` shows on a terminal (it sets
:attr:`SignalBackupSource.secret`). No error or log line holds it.

The whole file is decrypted, authenticated and replayed into a temporary
SQLite database on disk first (:mod:`connectors.sources.signal_replay`), so a
wrong passphrase, a tampered frame or a truncated file is one
``SourceError`` before a single record is yielded (nothing published, no
room released). Then the database is read thread by thread
(:mod:`connectors.sources.signal_db`) and the temporary folder removed.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources.scope import read_bounded
from connectors.sources.signal_crypto import BackupError, normalize_passphrase
from connectors.sources.signal_db import Database
from connectors.sources.signal_export import own_aci
from connectors.sources.signal_ids import NETWORK
from connectors.sources.signal_replay import MAX_INLINE_BYTES, replay
from topics.records import Content

PASSPHRASE_ENV = "SIGNAL_BACKUP_PASSPHRASE"
MEDIA_TYPES = ("image", "video", "audio")
MAX_PASSPHRASE_FILE = 4096


class SignalBackupSource(Source):
    name = "signal-backup"
    network = NETWORK
    description = "Signal Android encrypted .backup file (passphrase: prompt, file or env)"
    # backflow import asks for this on a terminal when no other source gave it.
    secret_prompt: ClassVar[str] = "Signal backup passphrase (30 digits)"

    def __init__(self, path: Path, options: dict[str, str] | None = None) -> None:
        super().__init__(path, options)
        self.secret: str | None = None

    def needs_secret(self) -> bool:
        """Whether no option or environment variable provides the passphrase."""
        env = self.options.get("passphrase_env", PASSPHRASE_ENV)
        return not self.options.get("passphrase_file") and not os.environ.get(env)

    def _passphrase(self) -> bytes:
        if "passphrase" in self.options:
            raise SourceError(
                "option passphrase: refused, a passphrase on the command line shows in ps; "
                f"use -o passphrase_file=PATH, ${PASSPHRASE_ENV} or the prompt"
            )
        env = self.options.get("passphrase_env", PASSPHRASE_ENV)
        raw = self.secret
        if raw is None and self.options.get("passphrase_file"):
            name = self.options["passphrase_file"]
            try:
                _, data = read_bounded(Path(name), MAX_PASSPHRASE_FILE)
            except OSError as exc:
                raise SourceError(
                    f"option passphrase_file: cannot read {name}: {exc.strerror}"
                ) from None
            if data is None:
                raise SourceError(f"option passphrase_file: {name} is not a passphrase file")
            raw = data.decode("utf-8", errors="replace")
        if raw is None:
            raw = os.environ.get(env)
        if not raw:
            raise SourceError(
                f"{self.path.name}: no passphrase: set ${env}, pass -o passphrase_file=PATH, "
                "or run on a terminal to be asked"
            )
        try:
            return normalize_passphrase(raw)
        except BackupError as exc:
            raise SourceError(f"{self.path.name}: {exc}") from None

    def read(self) -> Iterator[SourceItem]:
        passphrase = self._passphrase()
        self_aci = own_aci(self.options)
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        self.stats = Counter()
        for key in ("messages", "media", "media_missing", "reactions", "edits", "skipped"):
            self.stats[key] = 0
        with tempfile.TemporaryDirectory(prefix="backflow-signal-") as tmp, handle:
            self.track(handle, self.path.stat().st_size)
            try:
                result = replay(handle, passphrase, Path(tmp))
            except BackupError as exc:
                raise SourceError(f"{self.path.name}: {exc}; nothing was imported") from None
            try:
                self.payloads = result.payloads
                self.stats["frames"] = result.frames
                self.stats["unknown_frames"] = result.unknown_frames
                self.stats["statements_skipped"] = result.skipped_statements
                self.stats["statements_refused"] = result.refused_count
                for where, reason in result.refused:
                    yield Rejected(f"{self.path.name}:{where}", reason)
                found_aci = result.self_aci
                if self_aci and found_aci and self_aci != found_aci:
                    self.warn(f"option self_aci differs from the backup's own ACI {found_aci}")
                database = Database(
                    result.db, self_aci or found_aci, self._attach, self.stats, self.warn
                )
                if not database.layout():
                    raise SourceError(
                        f"{self.path.name}: the database has no message, sms or mms table"
                    )
                database.prepare()
                for item in database.threads():
                    if isinstance(item, Rejected):
                        item = Rejected(f"{self.path.name}:{item.where}", item.reason, key=item.key)
                    self.at = f"{self.path.name}:{database.where}"
                    yield item
            finally:
                result.db.close()

    def _attach(self, row: tuple[Any, ...]) -> Content:
        rowid, ctype, name, size, width, height = row
        ctype = ctype if isinstance(ctype, str) else None
        label = name if isinstance(name, str) and name else "attachment"
        path = self.payloads / str(rowid)
        if not path.is_file():
            if isinstance(size, int) and size > MAX_INLINE_BYTES:
                self.stats["media_too_large"] += 1
                return Content(
                    kind="notice",
                    body=f"{label} ({size} bytes, too large to import; limit {MAX_INLINE_BYTES})",
                )
            self.stats["media_missing"] += 1
            what = f"{label} ({ctype})" if ctype else label
            return Content(kind="notice", body=f"{what}: file not in the backup")
        data = path.read_bytes()  # at most MAX_INLINE_BYTES: larger payloads were not kept
        major = (ctype or "").split("/", 1)[0]
        self.stats["media"] += 1
        return Content(
            kind="media",
            media_type=major if major in MEDIA_TYPES else "file",
            body=label,
            filename=label,
            mimetype=ctype,
            size=len(data),
            data=base64.b64encode(data).decode("ascii"),
            width=width if isinstance(width, int) and width > 0 else None,
            height=height if isinstance(height, int) and height > 0 else None,
        )
