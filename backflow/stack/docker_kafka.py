"""Apache Kafka in Docker through testcontainers, when an engine is reachable.

Asked for with ``BACKFLOW_STACK_KAFKA=docker`` (``backflow stack up``) or
``BACKFLOW_TEST_KAFKA=docker`` (pytest): a real broker, with the admin API,
transactions and all. Without a Docker engine (as on CI here) asking for it
is a clear error, and the default stays librdkafka's mock cluster.
"""

from __future__ import annotations

from typing import Any

IMAGE = "apache/kafka:3.9.1"


class DockerUnavailable(RuntimeError):
    pass


def docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False
    return True


class DockerKafka:
    """A single-node KRaft Kafka container; ``bootstrap`` is reachable from the host."""

    def __init__(self, image: str = IMAGE) -> None:
        if not docker_reachable():
            raise DockerUnavailable(
                "Kafka in Docker was asked for, but no Docker engine is reachable; "
                "unset BACKFLOW_STACK_KAFKA / BACKFLOW_TEST_KAFKA to use the embedded broker"
            )
        from testcontainers.community.kafka import KafkaContainer

        self._container: Any = KafkaContainer(image).with_kraft()
        self._container.start()
        self.bootstrap: str = self._container.get_bootstrap_server()

    def close(self) -> None:
        self._container.stop()
