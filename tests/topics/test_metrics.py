"""consumer_lag on a real consumer of the broker, and the endpoint helpers."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from tests.helpers import free_port
from tests.pipeline_support import msg, pipeline_settings, publish, unique
from topics import bus
from topics.metrics import consumer_lag, counter, lag_metric, serve_metrics
from topics.settings import SettingsError


async def test_lag_is_end_offset_minus_position(kafka: Any, pg_admin: str, tmp_path: Path) -> None:
    settings = await pipeline_settings(kafka, pg_admin, tmp_path, partitions=1)
    topic = settings.catalog.history
    portal = unique("lag")
    await publish(settings, topic, [msg(portal, f"m{i}", i) for i in range(10)])
    consumer = bus.reader(settings, max_poll_records=3)
    await bus.start(consumer, settings)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got = await consumer.getmany(tp, timeout_ms=5000, max_records=3)
        assert len(got[tp]) == 3
        assert await consumer_lag(consumer) == {(topic, 0): 7}
        assert await consumer_lag(consumer, {"other"}) == {}
        family = lag_metric("x_lag", await consumer_lag(consumer))
        assert [(s.labels, s.value) for s in family.samples] == [
            ({"topic": topic, "partition": "0"}, 7)
        ]
    finally:
        await consumer.stop()


def test_endpoint_serves_collected_values_and_a_taken_port_is_a_clear_error() -> None:
    port = free_port()
    seen = {"n": 0}

    def collect():
        seen["n"] += 1
        yield counter("demo_things", "things", seen["n"])

    server = serve_metrics("127.0.0.1", port, collect)
    try:
        for expected in (1, 2):  # read at scrape time, not cached
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            assert f"demo_things_total {expected}.0" in body
        with pytest.raises(SettingsError, match=f"127.0.0.1:{port}"):
            serve_metrics("127.0.0.1", port, collect)
    finally:
        server.shutdown()
        server.server_close()
    assert serve_metrics("127.0.0.1", 0, collect) is None
