"""Read-only access to a mautrix-whatsapp database: a Postgres URL or a SQLite file.

The source contract is a plain generator, so Postgres (asyncpg) runs on a
private event loop in a helper thread and every query is one bounded page
(keyset pagination): memory stays flat whatever the table holds. SQLite is
opened read-only (``mode=ro``), so the importer can run beside a bridge that
holds the file. Queries are written once with ``?`` placeholders.

Two schemas are recognised by their table names (BRIEF section 7): bridgev2
(``whatsapp_history_sync_*``) and the legacy bridge (``history_sync_*``).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from connectors.source import SourceError
from topics.retry import Transient

BRIDGEV2, LEGACY = "bridgev2", "legacy"
SCHEMAS = {
    BRIDGEV2: ("whatsapp_history_sync_conversation", "whatsapp_history_sync_message"),
    LEGACY: ("history_sync_conversation", "history_sync_message"),
}
QUERY_TIMEOUT_S = 120.0


class DatabaseAway(SourceError, Transient):
    """The bridge's database could not be reached or read just now.

    One clear line for a one-shot import; transient for ``--follow``'s retry.
    """


def is_url(location: str) -> bool:
    return location.startswith(("postgres://", "postgresql://"))


def redact(location: str) -> str:
    """A location fit for logs: a URL's password is never shown."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", location)


class BridgeDB:
    """One open database; ``rows(sql, params)`` returns a list (one page)."""

    dialect = ""

    def __init__(self, location: str) -> None:
        self.location = location
        self.tables: set[str] = set()
        self.schema = ""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def detect(self) -> str:
        """Which schema the database holds; SourceError naming what was expected."""
        for schema, tables in SCHEMAS.items():
            if all(t in self.tables for t in tables):
                self.schema = schema
                return schema
        found = ", ".join(sorted(self.tables)[:12]) or "no tables"
        raise SourceError(
            f"{redact(self.location)}: not a mautrix-whatsapp database: expected the tables "
            "whatsapp_history_sync_conversation and whatsapp_history_sync_message (bridgev2) "
            f"or history_sync_conversation and history_sync_message (legacy); found {found}"
        )

    def has(self, table: str) -> bool:
        return table in self.tables


class SqliteDB(BridgeDB):
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        if not path.is_file():
            raise SourceError(f"{path}: no such database file")
        try:
            self.conn = sqlite3.connect(
                f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=10
            )
            self.tables = {r[0] for r in self.rows("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:
            raise SourceError(f"{path}: not a readable SQLite database ({exc})") from None

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as exc:  # locked, gone, disk I/O
            raise DatabaseAway(f"{self.location}: {exc}") from None

    def close(self) -> None:
        self.conn.close()


def _dollar(sql: str) -> str:
    """``?`` placeholders as Postgres's ``$1, $2 …``."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], start=1))


class PostgresDB(BridgeDB):
    dialect = "postgres"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        import asyncpg

        self._asyncpg = asyncpg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn: Any = None
        try:
            self.conn = self._run(asyncpg.connect(url, timeout=30))
            # Read-only by construction: the bridge owns this database.
            self._run(self.conn.execute("SET default_transaction_read_only = on"))
        except (
            TimeoutError,
            OSError,
            asyncpg.CannotConnectNowError,
            asyncpg.TooManyConnectionsError,
        ) as exc:
            self.close()
            raise DatabaseAway(f"{redact(url)}: cannot connect: {_reason(exc)}") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            self.close()
            raise SourceError(f"{redact(url)}: cannot connect: {_reason(exc)}") from None
        self.tables = {
            r[0]
            for r in self.rows(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = ANY(current_schemas(false))"
            )
        }

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(QUERY_TIMEOUT_S + 10)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            records = self._run(self.conn.fetch(_dollar(sql), *params, timeout=QUERY_TIMEOUT_S))
        except (TimeoutError, OSError, self._asyncpg.InterfaceError) as exc:
            raise DatabaseAway(f"{redact(self.location)}: {_reason(exc)}") from None
        except self._asyncpg.PostgresConnectionError as exc:
            raise DatabaseAway(f"{redact(self.location)}: {_reason(exc)}") from None
        return [tuple(r) for r in records]

    def close(self) -> None:
        if self.conn is not None:
            try:
                self._run(self.conn.close(timeout=5))
            except Exception:  # closing a broken connection: nothing left to do
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def _reason(exc: BaseException) -> str:
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def open_db(location: str) -> BridgeDB:
    """The database at ``location`` (URL or file), its schema detected."""
    db: BridgeDB = PostgresDB(location) if is_url(location) else SqliteDB(Path(location))
    try:
        db.detect()
    except SourceError:
        db.close()
        raise
    return db
