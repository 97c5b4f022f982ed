"""A real Synapse: appservice ghosts, timestamp massaging, restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
import yaml

from backflow.stack.postgres import drop_database
from backflow.stack.synapse import (
    Appservice,
    Synapse,
    create_synapse_database,
    default_appservice,
    postgres_database_config,
)


@pytest.fixture(scope="module")
def appservice() -> Appservice:
    return default_appservice()


LIMITED = Appservice(
    id="limited", as_token=f"lim-{uuid.uuid4().hex}", hs_token=f"limhs-{uuid.uuid4().hex}",
    sender_localpart="limited", user_prefix="_lim_", alias_prefix="_lim_", rate_limited=True,
)


@pytest.fixture(scope="module")
def hs(tmp_path_factory: pytest.TempPathFactory, appservice: Appservice) -> Iterator[Synapse]:
    server = Synapse(tmp_path_factory.mktemp("synapse"), appservices=[appservice, LIMITED])
    started = time.monotonic()
    server.start()
    print(f"synapse ready in {time.monotonic() - started:.1f}s")
    yield server
    server.stop()


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, token: str, **kw: object
) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, url, headers=headers, **kw) as resp:
        return resp.status, await resp.json()


def test_registration_dict(appservice: Appservice) -> None:
    reg = appservice.registration("backflow.test")
    assert reg["url"] is None and reg["rate_limited"] is False
    assert reg["namespaces"]["users"] == [{"exclusive": True, "regex": r"@_bf_.*:backflow\.test"}]
    assert reg["namespaces"]["aliases"][0]["exclusive"] is True
    assert default_appservice("seed") == default_appservice("seed")
    assert default_appservice().as_token != default_appservice().as_token


async def test_ghost_room_massaged_message(hs: Synapse, appservice: Appservice) -> None:
    api = f"{hs.url}/_matrix/client/v3"
    tok = appservice.as_token
    local = f"_bf_alice{uuid.uuid4().hex[:6]}"
    ghost = f"@{local}:{hs.server_name}"
    body = {"type": "m.login.application_service", "username": local, "inhibit_login": True}
    async with aiohttp.ClientSession() as s:
        status, data = await _call(s, "POST", f"{api}/register", tok, json=body)
        assert status == 200, data
        assert data["user_id"] == ghost
        status, data = await _call(s, "POST", f"{api}/register", tok, json=body)
        assert (status, data["errcode"]) == (400, "M_USER_IN_USE")
        outside = dict(body, username="mallory")
        status, data = await _call(s, "POST", f"{api}/register", tok, json=outside)
        assert data.get("errcode") == "M_EXCLUSIVE", data

        alias = f"_bf_portal{uuid.uuid4().hex[:6]}"
        status, room = await _call(
            s, "POST", f"{api}/createRoom", tok,
            json={"room_alias_name": alias, "invite": [ghost], "preset": "private_chat"},
        )
        assert status == 200, room
        room_id = quote(room["room_id"])
        status, data = await _call(
            s, "POST", f"{api}/rooms/{room_id}/join", tok, params={"user_id": ghost}
        )
        assert status == 200, data

        ts = 1_500_000_000_123
        status, sent = await _call(
            s, "PUT", f"{api}/rooms/{room_id}/send/m.room.message/txn-{uuid.uuid4().hex}", tok,
            params={"user_id": ghost, "ts": str(ts)},
            json={"msgtype": "m.text", "body": "hello from the past"},
        )
        assert status == 200, sent
        status, page = await _call(
            s, "GET", f"{api}/rooms/{room_id}/messages", tok,
            params={"dir": "b", "limit": "10", "user_id": ghost},
        )
        assert status == 200, page
        event = next(e for e in page["chunk"] if e["event_id"] == sent["event_id"])
        assert event["origin_server_ts"] == ts
        assert event["sender"] == ghost
        assert event["content"]["body"] == "hello from the past"


async def test_restart_keeps_data_and_port(hs: Synapse, appservice: Appservice) -> None:
    url, pid = hs.url, hs.pid
    hs.restart()
    assert hs.url == url and hs.pid not in (None, pid)
    async with aiohttp.ClientSession() as s:
        status, data = await _call(
            s, "GET", f"{hs.url}/_matrix/client/v3/account/whoami", appservice.as_token
        )
        assert status == 200 and data["user_id"] == f"@backflow:{hs.server_name}", data


def test_second_start_reuses_generated_config(tmp_path: Path) -> None:
    # Generation is the slow part of a first start; the file must be kept.
    hs = Synapse(tmp_path, appservices=[default_appservice()])
    hs._generate()
    first = hs.generated_config.read_text()
    hs._generate()
    assert hs.generated_config.read_text() == first


async def test_rate_limited_appservice_gets_429(hs: Synapse) -> None:
    api = f"{hs.url}/_matrix/client/v3"
    tok = LIMITED.as_token
    local = f"_lim_bob{uuid.uuid4().hex[:6]}"
    body = {"type": "m.login.application_service", "username": local, "inhibit_login": True}
    async with aiohttp.ClientSession() as s:
        status, data = await _call(s, "POST", f"{api}/register", tok, json=body)
        assert status == 200, data
        ghost = f"@{local}:{hs.server_name}"
        status, room = await _call(
            s, "POST", f"{api}/createRoom", tok, json={"preset": "public_chat"}
        )
        assert status == 200, room
        room_id = quote(room["room_id"])
        status, data = await _call(
            s, "POST", f"{api}/rooms/{room_id}/join", tok, params={"user_id": ghost}
        )
        assert status == 200, data
        # Synapse never limits the appservice's own sender, only its ghosts.
        for i in range(30):  # Synapse's default rc_message burst is 10
            url = f"{api}/rooms/{room_id}/send/m.room.message/t{i}-{uuid.uuid4().hex}"
            async with s.put(
                url, headers={"Authorization": f"Bearer {tok}"}, params={"user_id": ghost},
                json={"msgtype": "m.text", "body": str(i)},
            ) as resp:
                if resp.status == 429:
                    data = await resp.json()
                    assert data["errcode"] == "M_LIMIT_EXCEEDED"
                    assert "Retry-After" in resp.headers
                    return
                assert resp.status == 200, await resp.text()
    pytest.fail("no 429 from a rate-limited appservice")


async def test_synapse_on_postgres(pg_admin: str, tmp_path: Path) -> None:
    # Production homeservers run on PostgreSQL: the runner can too (bench --synapse-db).
    name = f"synapse_{uuid.uuid4().hex[:8]}"
    url = await create_synapse_database(pg_admin, name)
    hs = Synapse(tmp_path, appservices=[default_appservice()], database_url=url)
    try:
        started = time.monotonic()
        await asyncio.to_thread(hs.start, 15)
        assert time.monotonic() - started < 15
        config = yaml.safe_load(hs.config_path.read_text())
        assert config["database"]["name"] == "psycopg2"
        assert config["database"]["args"]["database"] == name
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{hs.url}/_matrix/client/versions") as resp:
                assert resp.status == 200 and "versions" in await resp.json()
    finally:
        await asyncio.to_thread(hs.stop)
        await drop_database(pg_admin, name)


def test_postgres_database_config() -> None:
    db = postgres_database_config("postgresql://u:p%40ss@db.local:5433/syn")
    assert db == {
        "name": "psycopg2",
        "args": {
            "user": "u", "password": "p@ss", "database": "syn", "host": "db.local",
            "port": 5433, "cp_min": 5, "cp_max": 10,
        },
    }
    socket_db = postgres_database_config("postgresql://postgres@/syn?host=/run/pg")
    assert socket_db["args"]["host"] == "/run/pg" and "password" not in socket_db["args"]
