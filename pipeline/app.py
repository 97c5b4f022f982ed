"""The faust app of the portal pipeline, configured for Apache Kafka and the mock broker.

The same settings on both: topics are never declared by faust (the catalog
provisions them), there is no leader topic and no faust table (state lives in
Postgres, so there is no changelog topic either), and session/heartbeat
timeouts are short because the mock broker waits a full session timeout
before each rebalance. Everything that reaches into private faust or aiokafka
internals (batch intake, fast delivery, fetch wait, group-error watch, the
mock broker's SyncGroup workaround) is in pipeline/faust_compat.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from aiokafka import TopicPartition
from faust.sensors import Sensor

from pipeline import faust_compat as compat
from pipeline.runtime import Runtime
from topics import bus
from topics.logs import setup_logging
from topics.settings import Settings

# Faust settings used by every worker (documented in docs/pipeline.md).
FAUST_SETTINGS: dict[str, object] = {
    "store": "memory://",
    "topic_allow_declare": False,
    "topic_disable_leader": True,
    "topic_replication_factor": 1,
    # > 0 keeps faust's own PartitionAssignor (faust switches to round-robin
    # otherwise): it gives partition N of history, live and portal-events to
    # the same worker, which is what makes one worker own a portal.
    "table_standby_replicas": 1,
    "broker_session_timeout": 6.0,
    "broker_heartbeat_interval": 1.0,
    "broker_commit_interval": 1.0,
    "consumer_auto_offset_reset": "earliest",
    "processing_guarantee": "at_least_once",
    "producer_acks": -1,
    # Bigger fetches and buffers: the agent applies records in batches.
    "stream_buffer_maxsize": 16384,
    "broker_max_poll_records": 5000,
    "consumer_max_fetch_size": 4 * 1024 * 1024,
    "web_enabled": False,
    "autodiscover": False,
}


class PipelineApp(faust.App):
    """A faust app whose only sensor does nothing.

    faust always adds its ``Monitor`` sensor, which records statistics on every
    message and stream event (only the web server's metrics views read them,
    and the pipeline runs without one); replacing it with the no-op base
    ``Sensor`` saves that per-event work. (With no sensor at all faust warns
    "Missing sensor state" on every rebalance.) faust's consumer still calls
    the monitor object directly for commit and end-offset bookkeeping.
    """

    def on_init_dependencies(self) -> Any:
        deps = super().on_init_dependencies()
        for sensor in list(self.sensors):
            self.sensors.remove(sensor)
        self.sensors.add(Sensor())
        return deps


def make_app(
    settings: Settings, *, flush_chunk: int = 5000, flush_pause: float = 0.0
) -> faust.App:
    """The pipeline app: group ``<prefix>-pipeline`` over the catalog's topics."""
    catalog = settings.catalog
    datadir = settings.state_dir / "faust" / catalog.processor_group
    datadir.mkdir(parents=True, exist_ok=True)
    app = PipelineApp(
        catalog.processor_group,
        broker=f"kafka://{bus.bootstrap(settings)}",
        topic_partitions=catalog.partitions,
        datadir=str(datadir),
        **FAUST_SETTINGS,
    )
    runtime = register(app, settings, flush_chunk=flush_chunk, flush_pause=flush_pause)
    app.pipeline_runtime = runtime  # type: ignore[attr-defined]
    return app


def register(
    app: faust.App, settings: Settings, *, flush_chunk: int = 5000, flush_pause: float = 0.0
) -> Runtime:
    """Attach the pipeline's agent, timer and rebalance hooks to ``app``."""
    catalog = settings.catalog
    runtime = Runtime(settings, flush_chunk=flush_chunk, flush_pause=flush_pause)
    names = [catalog.history, catalog.live, catalog.portal_events]
    source_names = set(names)
    sources = compat.intake_topic(app, names, catalog.partitions)

    @app.agent(sources, name="portal-pipeline")
    async def portal_pipeline(stream: faust.StreamT) -> None:
        await compat.consume_batches(app, stream, runtime.apply, prepare=runtime.prepare)

    @app.timer(interval=0.5)
    async def flush_outbox() -> None:
        # Produces CreateRoom decided by another worker's sync ranking, and
        # anything a failed flush left behind.
        if runtime.ready and not runtime.stopped:
            runtime.wake_flusher()

    @app.task
    async def observe() -> None:
        # After faust set up its log handlers: put our formatter on them.
        setup_logging(settings, level=None)

    watch: list[asyncio.Future] = []

    def watch_group() -> None:
        # Not an @app.timer: faust starts those only after the first
        # assignment, and a first SyncGroup can be the one that fails.
        # Every JoinGroup is preceded by a revoke, so this starts in time.
        if settings.kafka.mock_broker:
            compat.delay_leader_sync(app)  # a mock-broker bug; Apache Kafka needs no delay
        if not watch:
            watch.append(asyncio.ensure_future(compat.watch_group(app, lambda: runtime.stopped)))

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: set[TopicPartition], **_: Any) -> None:
        compat.shorten_fetch_wait(app)
        compat.fast_delivery(app)
        await runtime.on_assigned({tp.partition for tp in assigned if tp.topic in source_names})

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set[TopicPartition], **_: Any) -> None:
        watch_group()
        await runtime.on_revoked({tp.partition for tp in revoked if tp.topic in source_names})

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any, **_: Any) -> None:
        for task in watch:
            task.cancel()
        server = getattr(app, "pipeline_metrics", None)  # set by pipeline.worker
        if server is not None:
            server.shutdown()
            server.server_close()
        await runtime.stop()

    return runtime
