"""Replay a legacy ``.backup``'s SQL statements into a temporary SQLite file.

The backup is the phone's database as a stream of ``CREATE`` and ``INSERT``
statements. They come from a stranger, so only those two kinds run, under an
authorizer that refuses everything else (``ATTACH``, ``PRAGMA``, triggers,
recursive queries) and a progress handler that ends any one statement that
runs long. Attachment payloads small enough to import are written beside
the database, the rest only pass through their MAC. The whole file is read
and authenticated before the importer yields a single record.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from connectors.sources import protowire as pw
from connectors.sources.signal_crypto import BackupError, FrameReader, read_header
from connectors.sources.signal_ids import aci_text

MAX_INLINE_BYTES = 512 * 1024
MAX_STATEMENT_STEPS = 2_000_000  # VM steps: a real INSERT takes a few hundred
MAX_REPORTED = 100  # refused statements kept for dead letters; more are counted
_KINDS = ("CREATE TABLE ", "CREATE INDEX ", "CREATE UNIQUE INDEX ", "INSERT INTO ")
_ALLOWED = {
    sqlite3.SQLITE_CREATE_TABLE,
    sqlite3.SQLITE_CREATE_INDEX,
    sqlite3.SQLITE_INSERT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_UPDATE,  # CREATE updates sqlite_master
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_REINDEX,  # CREATE INDEX fills the new index
    sqlite3.SQLITE_SELECT,  # a multi-row VALUES is a compound SELECT
}
_FUNCTIONS = {"strftime", "datetime", "date", "time", "julianday", "lower", "upper", "length"}
_FUNCTIONS |= {"coalesce", "ifnull", "abs", "max", "min", "random", "hex", "printf", "unixepoch"}
_inserting = False  # set while an INSERT runs (one replay at a time per process)
# BackupFrame field numbers (Backups.proto).
HEADER, STATEMENT, PREFERENCE, ATTACHMENT, VERSION, END, AVATAR, STICKER, KEY_VALUE = range(1, 10)


@dataclass
class Replayed:
    """What the replay left: the database, payload files, and what it met."""

    db: sqlite3.Connection
    payloads: Path
    database_version: int | None = None
    self_aci: str | None = None
    frames: int = 0
    unknown_frames: int = 0
    statements: int = 0
    skipped_statements: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    refused_count: int = 0
    payloads_stored: int = 0


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
    if action == sqlite3.SQLITE_READ and _inserting:
        # An INSERT of a row reads no table; one that copies tables (INSERT ...
        # SELECT) could grow the database far beyond the backup.
        return sqlite3.SQLITE_DENY
    if action not in _ALLOWED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() not in _FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_UPDATE and arg1 != "sqlite_master":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _size_of(handle: IO[bytes]) -> int:
    try:
        return os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, AttributeError):
        return 1 << 30


def _parameter(raw: bytes) -> object:
    param = pw.message(raw)
    if 1 in param:
        return pw.text(pw.first(param, 1))
    if 2 in param:
        return pw.as_signed(pw.first(param, 2))
    if 3 in param:
        return pw.as_double(pw.first(param, 3))
    if 4 in param:
        value = pw.first(param, 4)
        return value if isinstance(value, bytes) else None
    return None  # nullparameter, or nothing set


def replay(handle: IO[bytes], passphrase: bytes, folder: Path) -> Replayed:
    """Authenticate and replay every frame; BackupError at the first that fails."""
    header = read_header(handle)
    reader = FrameReader(handle, header, passphrase)
    db = sqlite3.connect(folder / "backup.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    # The database never outgrows a few times the backup (plus room for indexes).
    size = _size_of(handle)
    db.execute(f"PRAGMA max_page_count = {(3 * size + (256 << 20)) // 4096}")
    payloads = folder / "payloads"
    payloads.mkdir()
    result = Replayed(db, payloads)
    steps = 0

    def progress() -> int:
        nonlocal steps
        steps += 1000
        return 1 if steps > MAX_STATEMENT_STEPS else 0

    db.execute("BEGIN")
    db.set_authorizer(_authorize)
    db.set_progress_handler(progress, 1000)
    try:
        while True:
            try:
                frame = pw.message(reader.frame())
            except pw.WireError as exc:
                raise BackupError(f"frame {reader.frames} is not a backup frame: {exc}") from None
            result.frames += 1
            if END in frame:
                break
            if STATEMENT in frame:
                steps = 0
                _statement(db, frame, reader.frames, result)
            elif ATTACHMENT in frame or STICKER in frame or AVATAR in frame:
                _payload(reader, frame, result)
            elif VERSION in frame:
                version = pw.message(pw.first(frame, VERSION, b""))
                result.database_version = pw.first(version, 1)
            elif KEY_VALUE in frame:
                _key_value(frame, result)
            elif PREFERENCE in frame:
                _preference(frame, result)
            elif HEADER in frame:
                continue
            else:
                result.unknown_frames += 1
    except pw.WireError as exc:
        raise BackupError(f"frame {reader.frames} is not a backup frame: {exc}") from None
    finally:
        db.set_authorizer(None)
        db.set_progress_handler(None, 0)
    db.execute("COMMIT")
    return result


def _statement(db: sqlite3.Connection, frame: dict, number: int, result: Replayed) -> None:
    statement = pw.message(pw.first(frame, STATEMENT, b""))
    sql = pw.text(pw.first(statement, 1)) or ""
    params = [_parameter(p) for p in statement.get(2, ()) if isinstance(p, bytes)]
    upper = sql.lstrip().upper()
    table = upper.split("(", 1)[0].split()
    if not upper.startswith(_KINDS) or any(t.strip('"`[]').startswith("SQLITE_") for t in table):
        result.skipped_statements += 1  # triggers, views, full-text tables, sqlite_*
        return
    global _inserting
    _inserting = upper.startswith("INSERT")
    try:
        db.execute(sql, params)
        result.statements += 1
    except (sqlite3.Error, OverflowError, ValueError) as exc:
        result.refused_count += 1
        if len(result.refused) < MAX_REPORTED:
            shown = sql if len(sql) <= 200 else sql[:200] + "…"
            result.refused.append((f"frame {number}", f"SQL statement refused ({exc}): {shown}"))
    finally:
        _inserting = False


def _payload(reader: FrameReader, frame: dict, result: Replayed) -> None:
    if ATTACHMENT in frame:
        info = pw.message(pw.first(frame, ATTACHMENT, b""))
        row, length, name = pw.first(info, 1), pw.first(info, 3, 0), "attachment"
    elif STICKER in frame:
        info = pw.message(pw.first(frame, STICKER, b""))
        row, length, name = None, pw.first(info, 2, 0), "sticker"
    else:
        info = pw.message(pw.first(frame, AVATAR, b""))
        row, length, name = None, pw.first(info, 2, 0), "avatar"
    if not isinstance(length, int):
        raise BackupError(f"frame {reader.frames}: the {name} has no length")
    what = f"the {name} after frame {reader.frames}"
    keep = isinstance(row, int) and length <= MAX_INLINE_BYTES
    chunks = reader.payload(length, what)
    if not keep:
        for _ in chunks:
            pass  # authenticated, not kept: too large to import, or not imported
        return
    target = result.payloads / f"{row}.part"
    with target.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
    target.rename(result.payloads / str(row))  # only a payload whose MAC held gets its name
    result.payloads_stored += 1


def _preference(frame: dict, result: Replayed) -> None:
    """Before key-value frames (2020) the own ACI was a shared preference."""
    entry = pw.message(pw.first(frame, PREFERENCE, b""))
    if pw.text(pw.first(entry, 2)) == "pref_local_uuid" and result.self_aci is None:
        result.self_aci = aci_text(pw.text(pw.first(entry, 3)))


def _key_value(frame: dict, result: Replayed) -> None:
    entry = pw.message(pw.first(frame, KEY_VALUE, b""))
    if pw.text(pw.first(entry, 1)) == "account.aci":
        result.self_aci = aci_text(pw.text(pw.first(entry, 7)))
