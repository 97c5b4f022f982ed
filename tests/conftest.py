"""Session-wide real services, started once: broker, Postgres, Synapse.

Tests are isolated by unique names, not by fresh services: each `stack`
fixture gets its own topic prefix (so its own topics and consumer groups) and
its own Postgres database; portals are unique per test too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backflow.stack.kafka import EmbeddedKafka
from backflow.stack.postgres import create_database, drop_database, resolve_admin_url
from backflow.stack.synapse import Appservice, Synapse, default_appservice
from topics.provision import provision
from topics.settings import Settings, load

# Partitions per topic in tests: enough to spread portals, few enough to
# keep consumer-group rebalances quick on the mock broker.
TEST_PARTITIONS = 4
# Every database made for a test; whatever is left is dropped at session end.
CREATED_DATABASES: list[str] = []


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedKafka | str]:
    """The broker: BACKFLOW_KAFKA_BOOTSTRAP if set; Kafka in Docker when
    BACKFLOW_TEST_KAFKA=docker (testcontainers); else librdkafka's mock cluster."""
    external = os.environ.get("BACKFLOW_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    if os.environ.get("BACKFLOW_TEST_KAFKA") == "docker":
        from backflow.stack.docker_kafka import DockerKafka

        container = DockerKafka()
        yield container.bootstrap
        container.close()
        return
    broker = EmbeddedKafka()
    yield broker
    broker.close()


@pytest.fixture(scope="session")
async def pg_admin(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    url, embedded = await resolve_admin_url(
        os.environ.get("BACKFLOW_DATABASE_URL"), tmp_path_factory.mktemp("pg")
    )
    yield url
    # Databases a test did not drop itself (module-scoped setups, failures).
    for name in CREATED_DATABASES:
        await drop_database(url, name)
    if embedded is not None:
        embedded.stop()


@pytest.fixture(scope="session")
def appservices() -> dict[str, Appservice]:
    """Two registrations on one Synapse: ghosts exempt from rate limits, and not."""
    free = default_appservice()
    limited = Appservice(
        id="backflow-limited",
        as_token=f"limited-{uuid.uuid4().hex}",
        hs_token=f"limited-hs-{uuid.uuid4().hex}",
        sender_localpart="backflow_limited",
        user_prefix="_bfl_",
        alias_prefix="_bfl_",
        rate_limited=True,
    )
    return {"free": free, "limited": limited}


@pytest.fixture(scope="session")
def synapse(
    tmp_path_factory: pytest.TempPathFactory, appservices: dict[str, Appservice]
) -> Iterator[Synapse]:
    server = Synapse(tmp_path_factory.mktemp("synapse"), appservices=list(appservices.values()))
    server.start()
    yield server
    server.stop()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def write_registration(path: Path, appservice: Appservice) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(appservice.registration()))
    return path


async def make_settings(
    kafka: EmbeddedKafka | str,
    pg_admin: str,
    synapse: Synapse | None,
    appservice: Appservice | None,
    tmp_path: Path,
    **overrides: object,
) -> tuple[Settings, str]:
    """Settings for one isolated test: own topics, own database, own state dir.

    Without ``synapse`` (pipeline-only tests) no homeserver is configured.
    """
    prefix = unique("t")
    db = unique("bf_")
    db_url = await create_database(pg_admin, db)
    CREATED_DATABASES.append(db)
    bootstrap = kafka if isinstance(kafka, str) else kafka.bootstrap
    values: dict[str, object] = {
        "kafka.bootstrap": bootstrap,
        "kafka.topic_prefix": prefix,
        "kafka.partitions": TEST_PARTITIONS,
        "kafka.mock_broker": not isinstance(kafka, str),  # the session's mock cluster
        "database.url": db_url,
        "state_dir": str(tmp_path / "state"),
    }
    if synapse is not None and appservice is not None:
        registration = write_registration(tmp_path / "registration.yaml", appservice)
        values.update(
            {
                "homeserver.url": synapse.url,
                "homeserver.server_name": synapse.server_name,
                "appservice.registration": str(registration),
            }
        )
    settings = load(env={}).with_overrides({**values, **overrides})
    await provision(
        settings.catalog,
        bootstrap=bootstrap,
        embedded=None if isinstance(kafka, str) else kafka,
    )
    return settings, db


async def _isolated(
    kafka: EmbeddedKafka | str,
    pg_admin: str,
    synapse: Synapse,
    appservice: Appservice,
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    settings, db = await make_settings(kafka, pg_admin, synapse, appservice, tmp_path)
    yield settings
    await drop_database(pg_admin, db)


@pytest.fixture
async def stack(
    kafka: EmbeddedKafka | str,
    pg_admin: str,
    synapse: Synapse,
    appservices: dict[str, Appservice],
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    """Settings wired to the real services, isolated for this test."""
    async for settings in _isolated(kafka, pg_admin, synapse, appservices["free"], tmp_path):
        yield settings


@pytest.fixture
async def limited_stack(
    kafka: EmbeddedKafka | str,
    pg_admin: str,
    synapse: Synapse,
    appservices: dict[str, Appservice],
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    """Like `stack`, but the appservice's ghosts are rate limited by Synapse."""
    async for settings in _isolated(kafka, pg_admin, synapse, appservices["limited"], tmp_path):
        yield settings
