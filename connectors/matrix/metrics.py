"""The sink's /metrics: SinkStats, the client's retry counts and the consumer's lag."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer
from prometheus_client.core import Metric

from connectors.matrix.stats import SinkStats
from topics.metrics import consumer_lag, counter, lag_metric, on_loop, serve_metrics
from topics.settings import Settings


def serve_sink_metrics(
    settings: Settings, stats: SinkStats, client_stats: dict[str, int], consumer: AIOKafkaConsumer
) -> Any:
    """Start the endpoint on ``metrics.sink_port`` (None when 0: off)."""
    loop = asyncio.get_running_loop()

    def collect() -> Iterator[Metric]:
        p = "backflow_sink_"
        yield counter(p + "commands", "Commands read from the command topic", stats.commands)
        yield counter(p + "sent", "Messages sent to the homeserver", stats.sent)
        yield counter(p + "skipped", "Commands already in the message map", stats.skipped)
        yield counter(p + "in_doubt_settled", "In-doubt sends found in the room", stats.settled)
        yield counter(p + "retried", "Batches retried after infrastructure errors", stats.retries)
        yield counter(p + "dead_lettered", "Commands dead-lettered", stats.dead_letters)
        yield counter(p + "rooms_created", "Rooms created", stats.rooms_created)
        yield counter(p + "rate_limited", "429 answers waited out", client_stats["rate_limited"])
        yield counter(p + "transient", "Failed requests retried", client_stats["transient"])
        yield from stats.send_seconds.collect()
        lag = on_loop(loop, consumer_lag(consumer))
        yield lag_metric(p + "consumer_lag", lag)

    return serve_metrics(settings.metrics.host, settings.metrics.sink_port, collect)
