"""Postgres for the local stack: a configured URL, the machine's server, or pgserver.

Always a real PostgreSQL: the sink's durable state relies on Postgres semantics
(transactions, ON CONFLICT, advisory locks), which SQLite would only imitate.
"""

from __future__ import annotations

import asyncio
import re
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# Database names we create: plain identifiers, so no quoting surprises.
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def server_answers(url: str, timeout: float = 2.0) -> bool:
    """True if a Postgres server accepts a connection at ``url`` within ``timeout``."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url, timeout=timeout), timeout)
    except Exception:  # refused, timed out, auth failed, bad URL: not usable
        return False
    try:
        await conn.fetchval("SELECT 1")
        return True
    finally:
        await conn.close()


def _get_server(data_dir: Path):  # noqa: ANN202 - pgserver's PostgresServer
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI).
        warnings.simplefilter("ignore")
        import pgserver

    # cleanup_mode="stop": the data survives, the server stops with us.
    return pgserver.get_server(data_dir, cleanup_mode="stop")


class EmbeddedPostgres:
    """A private PostgreSQL 16 server (pip ``pgserver``) with its data in ``data_dir``.

    The server listens on a Unix socket inside the data dir (pgserver's choice),
    so it never clashes with a system server's port.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir = Path(data_dir).expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self._server = _get_server(data_dir)
        self.url: str = self._server.get_uri("postgres")

    @property
    def pid(self) -> int | None:
        return self._server.get_pid()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def restart(self) -> None:
        """Stop the server (pg_ctl stop: sessions cut) and start it again on the same data."""
        url = self.url
        self.stop()
        self._server = _get_server(self.data_dir)
        self.url = self._server.get_uri("postgres")
        if self.url != url:  # the socket dir moved: clients holding the old URL would be lost
            raise RuntimeError(f"embedded Postgres came back at {self.url}, not {url}")


async def resolve_admin_url(
    explicit: str | None, state_dir: Path, embedded: bool = False
) -> tuple[str, EmbeddedPostgres | None]:
    """Pick the admin URL: explicit, else the local server, else an embedded one.

    ``embedded`` (setting ``database.embedded``) skips the local server: the
    caller owns a server it may stop, never the machine's shared one.

    Returns the URL and the EmbeddedPostgres started for it (the caller stops
    it), or None when nothing was started.
    """
    if explicit:
        return explicit, None
    if not embedded and await server_answers(LOCAL_URL):
        return LOCAL_URL, None
    # pgserver blocks (initdb, pg_ctl) for up to a few seconds.
    server = await asyncio.to_thread(EmbeddedPostgres, Path(state_dir) / "pg")
    return server.url, server


def _check_name(name: str) -> None:
    if not _DB_NAME.match(name):
        raise ValueError(
            f"invalid database name {name!r}: use lowercase letters, digits and _ "
            "(max 63, not starting with a digit)"
        )


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` with its database replaced by ``name`` (query kept, e.g. ?host=)."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(admin_url: str, name: str, options: str = "") -> str:
    """Create database ``name`` (no-op if it exists) and return its URL.

    ``options`` is appended to CREATE DATABASE (e.g. Synapse's collation needs).
    """
    _check_name(name)
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}" {options}'.rstrip())
            except asyncpg.DuplicateDatabaseError:
                pass  # created concurrently
    finally:
        await conn.close()
    return database_url(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions."""
    _check_name(name)
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
