"""`backflow stack up` machinery: the detached daemon with all embedded services."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from backflow.stack.daemon import read_env, start_background, stop_background


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state_dir = tmp_path_factory.mktemp("stack")
    started = time.monotonic()
    start_background(state_dir, partitions=2)
    print(f"stack up in {time.monotonic() - started:.1f}s")
    try:
        yield state_dir
    finally:
        stop_background(state_dir)


async def test_daemon_serves_everything(stack_dir: Path) -> None:
    env = read_env(stack_dir)
    for name in (
        "BACKFLOW_KAFKA_BOOTSTRAP",
        "BACKFLOW_DATABASE_URL",
        "BACKFLOW_HOMESERVER_URL",
        "BACKFLOW_HOMESERVER_SERVER_NAME",
        "BACKFLOW_APPSERVICE_REGISTRATION",
        "BACKFLOW_EMBEDDED_CONTROL",
    ):
        assert env.get(name), name
    # The in-process mock cluster: stages turn on its workarounds (pipeline/faust_compat.py).
    assert env.get("BACKFLOW_KAFKA_MOCK_BROKER") == "true"
    # Idempotent: a second `up` finds the running daemon.
    assert start_background(stack_dir) == env

    prefix = f"daemon-{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}.history"
    control = f"{env['BACKFLOW_EMBEDDED_CONTROL']}/topics"
    async with aiohttp.ClientSession() as http:
        body = {"prefix": prefix, "partitions": 3}
        async with http.post(control, json=body) as r:
            assert r.status == 200, await r.text()
            report = await r.json()
            assert {t["status"] for t in report["topics"]} == {"created"}
        async with http.post(control, json=body) as r:
            assert r.status == 200, await r.text()  # idempotent
            assert {t["status"] for t in (await r.json())["topics"]} == {"ok"}
        # A changed partition count is a failure per topic, never a silent "ok".
        async with http.post(control, json={"prefix": prefix, "partitions": 5}) as r:
            assert r.status == 409
            failed = (await r.json())["topics"]
            assert {t["status"] for t in failed} == {"failed"}
            assert "partitions is 3, catalog wants 5" in failed[0]["notes"][0]
        async with http.post(control, json={"partitions": 5}) as r:
            assert r.status == 400  # no prefix
        async with http.get(f"{env['BACKFLOW_HOMESERVER_URL']}/_matrix/client/versions") as r:
            assert r.status == 200

    bootstrap = env["BACKFLOW_KAFKA_BOOTSTRAP"]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
        partitions = await producer.partitions_for(topic)
        assert len(partitions) == 3
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id="g", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await consumer.getone()
        assert record.value == b"hello"
    finally:
        await consumer.stop()

    conn = await asyncpg.connect(env["BACKFLOW_DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()

    reg = yaml.safe_load(Path(env["BACKFLOW_APPSERVICE_REGISTRATION"]).read_text())
    assert reg["url"] is None and reg["namespaces"]["users"][0]["exclusive"]


def test_secrets_and_state_are_private(stack_dir: Path) -> None:
    """Registrations, Synapse's config, keys and database, stack.env: the owner's only."""
    env = read_env(stack_dir)
    secrets = [
        stack_dir / "stack.env",
        Path(env["BACKFLOW_APPSERVICE_REGISTRATION"]),
        *stack_dir.rglob("homeserver.yaml"),
        *stack_dir.rglob("*.signing.key"),
    ]
    assert len(secrets) >= 4, secrets
    for path in secrets:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"
    loose = [
        p
        for p in [stack_dir, *stack_dir.rglob("*")]
        if not p.is_symlink() and not p.is_socket() and p.stat().st_mode & 0o077
    ]
    assert loose == [], [f"{p} {oct(p.stat().st_mode)}" for p in loose[:10]]


def test_stop_removes_env_and_restart_keeps_tokens(stack_dir: Path) -> None:
    reg_before = Path(read_env(stack_dir)["BACKFLOW_APPSERVICE_REGISTRATION"]).read_text()
    db_before = read_env(stack_dir)["BACKFLOW_DATABASE_URL"]
    # The database belongs to this state dir: another stack on the same
    # Postgres server never sees its pipeline and sink state.
    assert "/backflow_" in db_before
    assert stop_background(stack_dir)
    assert not (stack_dir / "stack.env").exists()
    assert read_env(stack_dir) == {}
    assert not stop_background(stack_dir)
    env = start_background(stack_dir, partitions=2)
    assert Path(env["BACKFLOW_APPSERVICE_REGISTRATION"]).read_text() == reg_before
    assert env["BACKFLOW_DATABASE_URL"] == db_before
