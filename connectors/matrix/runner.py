"""Wiring: registration, homeserver client, store, broker, then the runtime loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from connectors.matrix.client import (
    MatrixClient,
    MatrixRequestError,
    MatrixUnreachable,
    describe,
)
from connectors.matrix.fetch import MediaPolicy
from connectors.matrix.metrics import serve_sink_metrics
from connectors.matrix.registration import Registration, RegistrationError, load_registration
from connectors.matrix.sink import MatrixSink, SinkError
from connectors.matrix.stats import SinkStats
from connectors.matrix.store import SinkStore, StoreUnreachable
from connectors.sink_runtime import Committer, Rebalance, run_task
from topics import bus
from topics.admin import require_topics
from topics.logs import add_secret
from topics.settings import Settings


def media_policy(settings: Settings) -> MediaPolicy:
    try:
        return MediaPolicy.parse(
            settings.sink.media_allow, settings.sink.media_max_bytes, settings.sink.media_timeout_s
        )
    except ValueError as exc:
        raise SinkError(f"sink.media_allow: {exc}") from None


async def open_client(settings: Settings, registration: Registration) -> MatrixClient:
    """A client for the configured homeserver, checked to answer and accept our token."""
    if not settings.homeserver.url or not settings.homeserver.server_name:
        raise SinkError(
            "no homeserver configured: set homeserver.url and homeserver.server_name "
            "(BACKFLOW_HOMESERVER_URL, BACKFLOW_HOMESERVER_SERVER_NAME)"
        )
    client = MatrixClient(
        settings.homeserver.url,
        registration.as_token,
        settings.homeserver.server_name,
        registration.sender_localpart,
        max_retry_delay=settings.sink.max_retry_delay_s,
        give_up_after=settings.sink.give_up_after_s,
        media_policy=media_policy(settings),
    )
    try:
        await client.versions()
    except MatrixUnreachable as exc:
        await client.close()
        raise SinkError(
            f"cannot reach the homeserver at {settings.homeserver.url}: {exc}"
        ) from None
    except MatrixRequestError as exc:
        await client.close()
        raise SinkError(
            f"the homeserver at {settings.homeserver.url} refused the appservice token: "
            f"{describe(exc)}"
        ) from None
    return client


async def run_sink(
    settings: Settings,
    stop: asyncio.Event | None = None,
    idle_exit: float | None = None,
    on_progress: Callable[[SinkStats], None] | None = None,
) -> SinkStats:
    """Consume the command topic until ``stop`` is set (or idle for ``idle_exit`` s).

    Raises SinkError (one clear line) when the registration, homeserver,
    database or broker is unusable at startup.
    """
    stop = stop or asyncio.Event()
    stats = SinkStats()
    try:
        registration = load_registration(settings.appservice.registration)
    except RegistrationError as exc:
        raise SinkError(str(exc)) from None
    add_secret(registration.as_token)
    client = await open_client(settings, registration)
    store: SinkStore | None = None
    producer: AIOKafkaProducer | None = None
    consumer: AIOKafkaConsumer | None = None
    metrics: Any = None

    def tick() -> None:
        stats.rate_limited = client.stats["rate_limited"]
        stats.transient = client.stats["transient"]
        if on_progress is not None:
            on_progress(stats)

    try:
        try:
            store = await SinkStore.open(
                settings.database.url, size=settings.sink.max_rooms_in_flight + 4
            )
        except StoreUnreachable as exc:
            raise SinkError(str(exc)) from None
        try:
            # Subscribed to a missing topic, the consumer would idle without a word.
            await require_topics(bus.bootstrap(settings), settings.catalog.sink_topics, "sink")
            producer = bus.producer(settings)
            await bus.start(producer, settings)
            consumer = bus.consumer(settings, group=settings.catalog.sink_group)
        except bus.BusError as exc:
            raise SinkError(str(exc)) from None
        sink = MatrixSink(settings, registration, client, store, producer, stats)
        await sink.start()
        committer = Committer(consumer, sink)
        try:
            await bus.start(consumer, settings)
        except bus.BusError as exc:
            raise SinkError(str(exc)) from None
        # Subscribed after start: start() would wait for the first assignment and
        # fail on a group error that a rejoin cures (run_task collects those).
        consumer.subscribe(
            [settings.catalog.matrix_commands], listener=Rebalance(sink, committer)
        )
        metrics = serve_sink_metrics(settings, stats, client.stats, consumer)
        await run_task(sink, consumer, committer, stop, idle_exit, tick)
        return stats
    finally:
        stats.rate_limited = client.stats["rate_limited"]
        stats.transient = client.stats["transient"]
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()
        if store is not None:
            await store.close()
        await client.close()
