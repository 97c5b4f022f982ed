"""A pipeline worker or sink started against missing topics stops with an error naming them.

On Apache Kafka with auto-create off, a consumer of a missing topic joins its
group, owns no partitions and idles without a word. The check lists topics
with an all-topics Metadata request, which creates nothing, also on the mock
broker (it auto-creates any topic a Metadata request names).
"""

from __future__ import annotations

import subprocess
import sys
import time

from backflow.stack.kafka import EmbeddedKafka
from tests.conftest import unique
from tests.connectors.matrix.test_recovery import sink_env
from topics.settings import Settings


def run(module: str, env: dict[str, str], cwd: object) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.monotonic() - started


def broker_topics(kafka: EmbeddedKafka | str, prefix: str) -> list[str]:
    if isinstance(kafka, str):
        return []  # an external broker: creation is its own business
    return [name for name in kafka.partition_counts() if name.startswith(prefix)]


async def test_worker_names_missing_topics(stack: Settings, kafka: EmbeddedKafka | str) -> None:
    prefix = unique("none")
    env = {**sink_env(stack), "BACKFLOW_KAFKA_TOPIC_PREFIX": prefix}
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    done, seconds = run("pipeline.worker", env, stack.state_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pipeline worker: topics missing on the Kafka broker" in done.stderr
    for topic in ("history", "live", "portal-events", "matrix-commands", "dead-letters"):
        assert f"{prefix}.{topic}" in done.stderr
    assert "backflow topics provision" in done.stderr
    assert seconds < 60
    assert broker_topics(kafka, prefix) == []


async def test_sink_names_missing_topics(stack: Settings, kafka: EmbeddedKafka | str) -> None:
    prefix = unique("none")
    env = {**sink_env(stack), "BACKFLOW_KAFKA_TOPIC_PREFIX": prefix}
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    done, seconds = run("connectors.matrix.sink_main", env, stack.state_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line == (
        f"error: sink: topics missing on the Kafka broker at {stack.kafka.bootstrap}: "
        f"{prefix}.matrix-commands, {prefix}.portal-events, {prefix}.dead-letters; "
        "create them with `backflow topics provision`"
    )
    assert broker_topics(kafka, prefix) == []
    # Through the CLI: the same line, exit status 1.
    cli = subprocess.run(
        [sys.executable, "-m", "backflow.cli", "sink"],
        env=env,
        cwd=stack.state_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 1
    assert f"{prefix}.matrix-commands" in cli.stderr
    # A provisioned catalog passes the check (the stack fixture provisioned its own).
    ok = subprocess.Popen(
        [sys.executable, "-m", "connectors.matrix.sink_main", "--idle-exit", "1"],
        env=sink_env(stack),
        cwd=stack.state_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = ok.communicate(timeout=120)
    assert ok.returncode == 0, out
    assert seconds < 60
