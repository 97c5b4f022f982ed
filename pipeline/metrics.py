"""The pipeline worker's /metrics: the runtime's counters, `backflow status` totals, lag."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric

from pipeline.runtime import Runtime
from pipeline.status import status_rows
from topics.metrics import consumer_lag, counter, gauge, lag_metric, on_loop, serve_metrics


def serve_worker_metrics(runtime: Runtime, app: Any, sources: set[str]) -> Any:
    """Start the endpoint on ``metrics.worker_port`` (None when 0: off).

    Called before faust starts, so a taken port stops the worker with a clear
    error; the loop and consumer are looked up at scrape time, once the
    runtime opened its pool on the first assignment.

    ``held`` / ``released`` are the totals ``backflow status`` shows, over
    every portal in the database, so every worker reports the same figures.
    """
    settings = runtime.settings

    def collect() -> Iterator[Metric]:
        p = "backflow_pipeline_"
        stats = runtime.stats
        yield counter(p + "applied", "Records applied to the hold store", stats["applied"])
        yield counter(p + "produced", "Commands produced to the sink", stats["produced"])
        yield counter(p + "dead_lettered", "Records dead-lettered", stats["dead_letters"])
        pool = runtime.pool
        if pool is None:  # None until the first assignment opened it
            return
        loop: asyncio.AbstractEventLoop = app.loop
        rows = on_loop(loop, status_rows(pool))
        yield gauge(p + "held", "Messages held, all portals", sum(r["held"] for r in rows))
        released = sum(r["released"] for r in rows)
        yield gauge(p + "released", "Messages released, all portals", released)
        yield gauge(p + "portals", "Portals known", len(rows))
        lag = on_loop(loop, consumer_lag(app.consumer, sources))
        yield lag_metric(p + "consumer_lag", lag)

    return serve_metrics(settings.metrics.host, settings.metrics.worker_port, collect)
