"""The Docker path of the stack: a clear error here, where no engine runs."""

import pytest

from backflow.stack.docker_kafka import DockerKafka, DockerUnavailable, docker_reachable


def test_asking_for_docker_without_an_engine_is_one_clear_error(monkeypatch):
    if docker_reachable():
        pytest.skip("a Docker engine is reachable here; the error path does not apply")
    with pytest.raises(DockerUnavailable, match="no Docker engine is reachable"):
        DockerKafka()
