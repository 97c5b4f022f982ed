"""A tiny faust-streaming app run as a subprocess by tests/test_stack_kafka.py.

It checks that faust works against the embedded (librdkafka mock) broker with
the settings from BRIEF section 4: an agent consumes ``IN_TOPIC``, counts per
key in a table (changelog pre-created), and forwards to ``OUT_TOPIC``.
"""

from __future__ import annotations

import os
import sys

import faust

APP_ID = os.environ.get("FAUST_APP_ID", "stacktest")
IN_TOPIC = os.environ.get("FAUST_IN_TOPIC", "stack-in")
OUT_TOPIC = os.environ.get("FAUST_OUT_TOPIC", "stack-out")
PARTITIONS = int(os.environ.get("FAUST_PARTITIONS", "2"))

app = faust.App(
    APP_ID,
    broker=f"kafka://{os.environ['BACKFLOW_KAFKA_BOOTSTRAP']}",
    store="memory://",
    # The mock cluster has no CreateTopics: every topic is provisioned first.
    topic_allow_declare=False,
    # The leader topic would need CreateTopics too; we do not use it.
    topic_disable_leader=True,
    topic_partitions=PARTITIONS,
    topic_replication_factor=1,
    # The mock waits a full session timeout before each rebalance.
    broker_session_timeout=6.0,
    broker_heartbeat_interval=1.0,
    web_enabled=False,
    datadir=os.environ.get("FAUST_DATADIR", "/tmp/faust-stacktest"),
)

src = app.topic(IN_TOPIC, key_serializer="raw", value_serializer="raw", partitions=PARTITIONS)
dst = app.topic(OUT_TOPIC, key_serializer="raw", value_serializer="raw", partitions=PARTITIONS)
counts = app.Table("counts", default=int, partitions=PARTITIONS)


@app.agent(src)
async def forward(stream: faust.StreamT) -> None:
    async for event in stream.events():
        key = event.key.decode()
        counts[key] += 1
        value = f"{event.value.decode()}|{counts[key]}".encode()
        await dst.send(key=event.key, value=value)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "info", *sys.argv[1:]]
    app.main()
