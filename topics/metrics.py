"""Prometheus endpoints: each process exposes the counters it already keeps.

A process passes a ``collect`` callable that turns its own bookkeeping
(SinkStats, the pipeline runtime and status query, ingest's counts) into
metric families at scrape time; nothing is counted twice. The HTTP server
runs in prometheus-client's thread; ``on_loop`` runs a coroutine (a database
query, a consumer position) on the process's event loop for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from topics.settings import SettingsError

log = logging.getLogger("backflow.metrics")
SCRAPE_TIMEOUT = 5.0


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # noqa: BLE001 - a failed scrape must not end the process
            log.exception("collecting metrics failed")


def serve_metrics(host: str, port: int, collect: Callable[[], Iterable[Metric]]) -> Any:
    """Start ``http://host:port/metrics``; returns the server (None when port is 0)."""
    if not port:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Callback(collect))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # two processes given one port, most likely
        raise SettingsError(f"metrics endpoint {host}:{port}: {exc.strerror or exc}") from None
    log.info("metrics on http://%s:%s/metrics", host, port)
    return server


def on_loop(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on ``loop`` from the scrape thread and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(SCRAPE_TIMEOUT)  # type: ignore[arg-type]


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


async def consumer_lag(consumer: Any, topics: set[str] | None = None) -> dict[tuple[str, int], int]:
    """Messages between the consumer's position and the end of each assigned partition.

    Works on an aiokafka consumer and on faust's (both have ``assignment()``,
    ``highwater(tp)`` and ``async position(tp)``). Partitions with no fetch yet
    (highwater unknown) are left out.
    """
    out: dict[tuple[str, int], int] = {}
    for tp in consumer.assignment():
        if topics is not None and tp.topic not in topics:
            continue
        high = consumer.highwater(tp)
        if high is None or high < 0:
            continue
        try:
            position = await consumer.position(tp)
        except Exception:  # noqa: BLE001 - revoked while scraping: the next scrape is right
            continue
        if position is None:
            continue
        out[(tp.topic, tp.partition)] = max(0, high - position)
    return out


def lag_metric(name: str, lag: dict[tuple[str, int], int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        name, "Messages not yet consumed, per topic partition", labels=["topic", "partition"]
    )
    for (topic, partition), value in sorted(lag.items()):
        family.add_metric([topic, str(partition)], value)
    return family
