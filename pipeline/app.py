"""The faust app of the portal pipeline, configured for Apache Kafka and the mock broker.

The same settings run unpatched on both (BRIEF section 4): topics are never
declared by faust (the catalog provisions them), there is no leader topic and
no faust table (state lives in Postgres, so there is no changelog topic either),
and session/heartbeat timeouts are short because the mock broker waits a full
session timeout before each rebalance.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.sensors import Sensor

from backflow import bus
from backflow.settings import Settings
from pipeline.processors import Runtime, register

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


def make_app(settings: Settings, *, flush_chunk: int = 5000) -> faust.App:
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
    app.pipeline_runtime = register(app, settings, flush_chunk=flush_chunk)  # type: ignore[attr-defined]
    return app


def runtime_of(app: faust.App) -> Runtime:
    return app.pipeline_runtime  # type: ignore[attr-defined]
