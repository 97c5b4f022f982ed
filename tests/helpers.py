"""Small helpers shared by integration tests (no fakes: real broker reads)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from topics.codec import decode
from topics.records import Record
from topics.settings import Settings

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SAMPLES = TESTS / "samples"


T = TypeVar("T")


def traced_peak(run: Callable[[], T]) -> tuple[T, int]:
    """``run()``'s result and the peak of Python memory allocated while it ran."""
    tracemalloc.start()
    try:
        result = run()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def read_raw(
    settings: Settings, topic: str, expect: int | None = None, timeout: float = 30.0
) -> list[tuple[bytes | None, bytes]]:
    """Every (key, value) in a topic, from the beginning, without a consumer group.

    With ``expect``, waits until at least that many arrived (or times out and
    returns what is there, so the caller's assertion shows the difference);
    without it, reads up to the current end of every partition.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        out: list[tuple[bytes | None, bytes]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for messages in batch.values():
                out.extend((m.key, m.value) for m in messages)
            if expect is not None:
                if len(out) >= expect:
                    # A little longer to catch extras (duplicates) that would follow.
                    await asyncio.sleep(0.3)
                    for messages in (await consumer.getmany(timeout_ms=300)).values():
                        out.extend((m.key, m.value) for m in messages)
                    break
            else:
                ends = await consumer.end_offsets(partitions)
                positions = [await consumer.position(tp) for tp in partitions]
                if all(pos >= ends[tp] for pos, tp in zip(positions, partitions, strict=True)):
                    break
        return out
    finally:
        await consumer.stop()


async def read_topic(
    settings: Settings, topic: str, expect: int | None = None, timeout: float = 30.0
) -> list[Record]:
    """Like ``read_raw``, decoded with the one codec."""
    return [decode(value) for _, value in await read_raw(settings, topic, expect, timeout)]


def stage_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `backflow` child process that reads these settings."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFLOW_")}
    values = {
        "BACKFLOW_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "BACKFLOW_KAFKA_TOPIC_PREFIX": settings.kafka.topic_prefix,
        "BACKFLOW_KAFKA_PARTITIONS": str(settings.kafka.partitions),
        "BACKFLOW_KAFKA_MOCK_BROKER": str(settings.kafka.mock_broker).lower(),
        "BACKFLOW_DATABASE_URL": settings.database.url,
        "BACKFLOW_HOMESERVER_URL": settings.homeserver.url,
        "BACKFLOW_HOMESERVER_SERVER_NAME": settings.homeserver.server_name,
        "BACKFLOW_APPSERVICE_REGISTRATION": settings.appservice.registration,
        "BACKFLOW_STATE_DIR": str(settings.state_dir),
        "BACKFLOW_BACKFILL_ENABLED": str(settings.backfill.enabled).lower(),
        "BACKFLOW_BACKFILL_MAX_INITIAL_MESSAGES": str(settings.backfill.max_initial_messages),
        "BACKFLOW_BACKFILL_MAX_CATCHUP_MESSAGES": str(settings.backfill.max_catchup_messages),
        "BACKFLOW_BACKFILL_MAX_INITIAL_CONVERSATIONS": str(
            settings.backfill.max_initial_conversations
        ),
    }
    env.update({k: v for k, v in values.items() if v is not None})
    env.update(extra)
    return env


def backflow_cli(
    settings: Settings, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``backflow ARGS`` as an operator would, against these settings (plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "backflow.cli", *args],
        env=stage_env(settings, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_stages(settings: Settings, logs: Path | None = None) -> list[subprocess.Popen]:
    """``backflow worker`` and ``backflow sink`` as child processes (logs in ``logs``)."""
    env = stage_env(settings)
    children = []
    for stage in ("worker", "sink"):
        out = open(logs / f"{stage}.log", "wb") if logs else subprocess.DEVNULL  # noqa: SIM115
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "backflow.cli", stage],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    return children


def stop_stages(children: list[subprocess.Popen]) -> None:
    for child in children:
        child.terminate()
    for child in children:
        child.wait(30)


async def portal_timeline(
    settings: Settings, network: str, portal: str, types: tuple[str, ...] = ("m.room.message",)
) -> list[dict] | None:
    """A portal room's events straight from Synapse's client API, oldest first.

    Reads with the appservice token (as the bot, which creates every portal
    room); None while the room does not exist yet or is still being created.
    """
    import urllib.parse

    import aiohttp
    import yaml

    from connectors.matrix.ghosts import room_alias

    registration = yaml.safe_load(open(settings.appservice.registration))
    token = registration["as_token"]
    prefix = registration["namespaces"]["aliases"][0]["regex"].lstrip("#").split(".*")[0]
    alias = room_alias(prefix, network, portal, settings.homeserver.server_name)
    headers = {"Authorization": f"Bearer {token}"}
    base = f"{settings.homeserver.url}/_matrix/client/v3"
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{base}/directory/room/{urllib.parse.quote(alias, safe='')}") as resp:
            if resp.status == 404:
                return None
            assert resp.status == 200, await resp.text()
            room_id = (await resp.json())["room_id"]
        events: list[dict] = []
        params = {"dir": "f", "limit": "500"}
        while True:
            url = f"{base}/rooms/{urllib.parse.quote(room_id)}/messages"
            async with http.get(url, params=params) as resp:
                if resp.status == 403 and not events:
                    # Synapse makes the alias before the creator's join: the
                    # room is still being created. Not there yet, like a 404.
                    return None
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            events += [e for e in page.get("chunk", []) if e["type"] in types]
            if not page.get("end") or not page.get("chunk"):
                return events
            params["from"] = page["end"]


async def scrape(port: int) -> dict[str, float]:
    """A process's /metrics as {"name{label=value,...}": value} (counters end in _total)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def scrape_until(
    port: int, check: Callable[[dict[str, float]], bool], timeout: float = 60.0
) -> dict[str, float]:
    """Scrape until ``check`` holds (the endpoint may not be up yet); the last scrape."""
    import aiohttp

    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while True:
        try:
            last = await scrape(port)
            if check(last):
                return last
        except aiohttp.ClientConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched; last scrape: {last}")
        await asyncio.sleep(0.3)
