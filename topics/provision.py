"""Create the catalog's topics: on Apache Kafka through the admin API, on the
embedded mock broker through the stack's control endpoint (the mock cluster
lives in the `backflow stack up` process and has no CreateTopics support)."""

from __future__ import annotations

from typing import Protocol

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from topics.catalog import Catalog, TopicSpec


class ProvisionError(RuntimeError):
    pass


class TopicCreator(Protocol):
    def create_topic(self, name: str, partitions: int, replication: int = 1) -> None: ...


async def provision(
    catalog: Catalog,
    *,
    bootstrap: str | None = None,
    control_url: str | None = None,
    embedded: TopicCreator | None = None,
    replication: int = 1,
) -> list[TopicSpec]:
    """Create every topic of the catalog (existing ones are left as they are)."""
    specs = catalog.specs()
    if embedded is not None:
        for spec in specs:
            embedded.create_topic(spec.name, spec.partitions)
    elif control_url:
        body = {"topics": [{"name": s.name, "partitions": s.partitions} for s in specs]}
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{control_url}/topics", json=body) as resp:
                    if resp.status != 200:
                        raise ProvisionError(f"embedded broker refused: {await resp.text()}")
        except aiohttp.ClientError as exc:
            raise ProvisionError(f"embedded stack not reachable at {control_url}: {exc}") from None
    elif bootstrap:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await admin.start()
        except Exception as exc:
            raise ProvisionError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
        try:
            for spec in specs:
                topic = NewTopic(
                    spec.name, spec.partitions, replication, topic_configs=spec.config()
                )
                try:
                    await admin.create_topics([topic])
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()
    else:
        raise ProvisionError("no broker: set BACKFLOW_KAFKA_BOOTSTRAP or run `backflow stack up`")
    return specs
