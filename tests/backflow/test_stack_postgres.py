"""Postgres helpers against real servers: the machine's and an embedded pgserver."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from backflow.stack.postgres import (
    LOCAL_URL,
    EmbeddedPostgres,
    create_database,
    drop_database,
    resolve_admin_url,
    server_answers,
)


async def _roundtrip(admin_url: str) -> None:
    name = f"bf_stacktest_{uuid.uuid4().hex[:8]}"
    url = await create_database(admin_url, name)
    assert url != admin_url and name in url
    assert await create_database(admin_url, name) == url  # idempotent
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT current_database()") == name
        await conn.execute("CREATE TABLE t (x int)")
    finally:
        await conn.close()
    # A session still connected must not block the drop (WITH (FORCE)).
    lingering = await asyncpg.connect(url)
    try:
        await drop_database(admin_url, name)
    finally:
        await lingering.close()
    admin = await asyncpg.connect(admin_url)
    try:
        assert not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await admin.close()
    await drop_database(admin_url, name)  # absent: no error


async def test_server_answers() -> None:
    assert not await server_answers("postgresql://postgres@127.0.0.1:1/postgres", timeout=1)


async def test_invalid_names_rejected() -> None:
    for bad in ("", "Bad", 'x"; DROP', "1abc", "a" * 64):
        with pytest.raises(ValueError):
            await create_database(LOCAL_URL, bad)
        with pytest.raises(ValueError):
            await drop_database(LOCAL_URL, bad)


async def test_local_server_create_drop() -> None:
    if not await server_answers(LOCAL_URL):
        pytest.skip("no Postgres at 127.0.0.1:5432")
    url, embedded = await resolve_admin_url(None, Path("/nonexistent"))
    assert (url, embedded) == (LOCAL_URL, None)
    await _roundtrip(LOCAL_URL)


async def test_explicit_url_wins(tmp_path: Path) -> None:
    url, embedded = await resolve_admin_url("postgresql://x@example.invalid/db", tmp_path)
    assert (url, embedded) == ("postgresql://x@example.invalid/db", None)


async def test_embedded_pgserver(tmp_path: Path) -> None:
    import asyncio

    pg = await asyncio.to_thread(EmbeddedPostgres, tmp_path / "pg")
    try:
        assert pg.pid
        assert await server_answers(pg.url)
        await _roundtrip(pg.url)
    finally:
        await asyncio.to_thread(pg.stop)
    assert not await server_answers(pg.url, timeout=1)


async def test_embedded_forced_even_beside_a_local_server_and_restarted_keeps_its_data(
    tmp_path: Path,
) -> None:
    """database.embedded: a server the caller owns (and may restart), never the shared one."""
    import asyncio

    url, pg = await resolve_admin_url(None, tmp_path, embedded=True)
    assert pg is not None and url == pg.url and url != LOCAL_URL
    try:
        name = f"bf_{uuid.uuid4().hex[:10]}"
        await create_database(url, name)
        await asyncio.to_thread(pg.restart)
        assert pg.url == url and await server_answers(url)
        conn = await asyncpg.connect(url)
        try:
            found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        finally:
            await conn.close()
        assert found == 1  # same data directory after the restart
    finally:
        await asyncio.to_thread(pg.stop)
