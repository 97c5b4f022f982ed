"""`backflow topics provision` / `list`: every per-topic broker answer checked, drift reported.

The mock broker lacks CreateTopics, CreatePartitions, DescribeConfigs and
AlterConfigs. So the broker's answers to those are covered with aiokafka's
own response types, encoded to bytes and decoded back as the admin client
reads them off the wire; the admin path itself runs against the mock, where
every such request fails and must fail loudly. Not shown on the mock (Apache
Kafka only, see docs/kafka.md): a topic really created with its configs, a
replication factor the cluster cannot satisfy answered by the broker (code
38), partitions actually added, configs actually altered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
from aiokafka.protocol.admin import (
    AlterConfigsResponse_v1,
    CreatePartitionsResponse_v0,
    CreateTopicsResponse_v0,
    CreateTopicsResponse_v3,
    DescribeConfigsResponse_v0,
    DescribeConfigsResponse_v1,
)

from backflow.demo import broker_label
from backflow.stack.kafka import EmbeddedKafka
from tests.conftest import unique
from tests.helpers import REPO
from topics.admin import (
    BrokerTopic,
    ConfigEntry,
    described_configs,
    merged_configs,
    new_topics,
    resource_errors,
    topic_errors,
)
from topics.catalog import FOREVER, Catalog
from topics.provision import ProvisionError, drift, provision
from topics.settings import load


def wire(response_type: type, **fields: object) -> object:
    """A response as the admin client gets it: encoded by the broker, decoded by aiokafka."""
    data = response_type(**fields).encode()
    return response_type.decode(BytesIO(data))


def test_create_topics_results_are_checked_per_topic() -> None:
    response = wire(
        CreateTopicsResponse_v3,
        throttle_time_ms=0,
        topic_errors=[
            ("bf.history", 0, None),
            ("bf.live", 36, "Topic 'bf.live' already exists."),
            ("bf.portal-events", 38, "Replication factor: 3 larger than available brokers: 1."),
            ("bad prefix.x", 17, "Topic name is invalid"),
        ],
    )
    errors = topic_errors(response)
    assert errors["bf.history"] is None
    assert errors["bf.live"].startswith("TopicAlreadyExistsError (36)")
    assert errors["bf.portal-events"] == (
        "InvalidReplicationFactorError (38): Replication factor: 3 larger than available "
        "brokers: 1."
    )
    assert errors["bad prefix.x"].startswith("InvalidTopicError (17)")
    # v0 has no error messages: the code alone still names the error.
    old = wire(CreateTopicsResponse_v0, topic_errors=[("t", 37)])
    assert topic_errors(old) == {"t": "InvalidPartitionsError (37)"}
    grown = wire(
        CreatePartitionsResponse_v0,
        throttle_time_ms=0,
        topic_errors=[("t", 37, "Topic currently has 8 partitions, which is higher than 4")],
    )
    assert "InvalidPartitionsError (37)" in topic_errors(grown)["t"]


def test_config_answers_and_what_alter_sends() -> None:
    v1 = wire(
        DescribeConfigsResponse_v1,
        throttle_time_ms=0,
        resources=[
            (
                0,
                None,
                2,
                "bf.history",
                [
                    ("retention.ms", "604800000", False, 5, False, []),  # broker default
                    ("cleanup.policy", "delete", False, 5, False, []),
                    ("max.message.bytes", "2000000", False, 1, False, []),  # operator's
                    ("min.insync.replicas", "2", True, 1, False, []),  # read-only
                ],
            ),
            (3, "This server does not host this topic-partition.", 2, "bf.gone", []),
        ],
    )
    configs = described_configs([v1])
    assert configs["bf.gone"].startswith("UnknownTopicOrPartitionError (3)")
    history = configs["bf.history"]
    assert isinstance(history, dict)
    assert history["retention.ms"] == ConfigEntry("604800000", False, False, False)
    assert history["max.message.bytes"].overridden
    topic = BrokerTopic("bf.history", 4, 1, history)
    spec = Catalog(prefix="bf", partitions=4).specs()[0]
    # Topics created without configs get 7 days: drift, fixable by AlterConfigs.
    found = drift(spec, topic, 1)
    assert [(d.what, d.have, d.want, d.fixable) for d in found] == [
        ("retention.ms", "604800000", str(FOREVER), True)
    ]
    # AlterConfigs replaces every config: the operator's own override goes along.
    assert merged_configs(topic, spec.config()) == {
        "max.message.bytes": "2000000",
        "retention.ms": "-1",
        "cleanup.policy": "delete",
    }
    v0 = wire(
        DescribeConfigsResponse_v0,
        throttle_time_ms=0,
        resources=[(0, None, 2, "t", [("retention.ms", "-1", False, False, False)])],
    )
    assert described_configs([v0])["t"]["retention.ms"].overridden  # not is_default
    altered = wire(
        AlterConfigsResponse_v1,
        throttle_time_ms=0,
        resources=[
            (0, None, 2, "a"),
            (40, "Invalid value -5 for configuration retention.ms", 2, "b"),
        ],
    )
    errors = resource_errors([altered])
    assert errors["a"] is None
    assert errors["b"].startswith("InvalidConfigurationError (40): Invalid value -5")


def test_drift_and_created_configs() -> None:
    catalog = Catalog(prefix="bf", partitions=8)
    spec = catalog.specs()[3]  # matrix-commands: 7 days, delete
    kept = BrokerTopic(spec.name, 8, 1, None)
    assert drift(spec, kept, 1) == []  # configs unknown: only the shape compared
    fewer = drift(spec, BrokerTopic(spec.name, 4, 1, None), 3)
    assert [(d.what, d.fixable) for d in fewer] == [("partitions", True), ("replication", False)]
    more = drift(spec, BrokerTopic(spec.name, 16, 1, None), 1)
    assert [(d.what, d.fixable) for d in more] == [("partitions", False)]
    # Every topic is created with its catalog configs and the replication setting.
    created = {t.name: t for t in new_topics(catalog.specs(), 3)}
    assert created[catalog.history].topic_configs == {
        "retention.ms": "-1",
        "cleanup.policy": "delete",
    }
    assert created[catalog.dead_letters].topic_configs["retention.ms"] == str(90 * 86_400_000)
    assert {t.replication_factor for t in created.values()} == {3}


async def test_embedded_provisioning_reports_every_topic(kafka: EmbeddedKafka | str) -> None:
    if isinstance(kafka, str):
        pytest.skip("this test drives the in-process mock cluster")
    catalog = Catalog(prefix=unique("prov"), partitions=3)
    with pytest.raises(ProvisionError) as checked:  # --check creates nothing
        await provision(catalog, embedded=kafka, fix=False)
    assert checked.value.report is not None
    assert {t.status for t in checked.value.report.topics} == {"drift"}
    assert not any(name.startswith(catalog.prefix) for name in kafka.partition_counts())
    report = await provision(catalog, embedded=kafka)
    assert [t.status for t in report.topics] == ["created"] * 5
    again = await provision(catalog, embedded=kafka)
    assert [t.status for t in again.topics] == ["ok"] * 5
    with pytest.raises(ProvisionError) as failed:
        await provision(Catalog(prefix=catalog.prefix, partitions=6), embedded=kafka)
    assert failed.value.report is not None
    assert {t.status for t in failed.value.report.topics} == {"failed"}
    assert "partitions is 3, catalog wants 6" in str(failed.value)


async def test_admin_path_fails_loudly_where_the_broker_cannot(kafka: EmbeddedKafka | str) -> None:
    """The admin path against the mock: CreateTopics is refused, and it says so per topic."""
    if isinstance(kafka, str):
        pytest.skip("shows the mock broker's refusals")
    catalog = Catalog(prefix=unique("adm"), partitions=3)
    with pytest.raises(ProvisionError) as failed:
        await provision(catalog, bootstrap=kafka.bootstrap)
    report = failed.value.report
    assert report is not None and len(report.failed) == 5
    assert all("no CreateTopics" in t.notes[0] for t in report.topics)
    # Nothing was auto-created by looking.
    assert not any(name.startswith(catalog.prefix) for name in kafka.partition_counts())

    # Existing topics of the right shape pass; configs cannot be compared on the mock.
    await provision(catalog, embedded=kafka)
    ok = await provision(catalog, bootstrap=kafka.bootstrap)
    assert [t.status for t in ok.topics] == ["ok"] * 5
    assert any("no DescribeConfigs" in n for n in ok.notes)
    # Too few partitions: the admin path tries CreatePartitions; the mock refuses.
    with pytest.raises(ProvisionError) as grown:
        await provision(Catalog(prefix=catalog.prefix, partitions=5), bootstrap=kafka.bootstrap)
    assert grown.value.report is not None
    assert all("no CreatePartitions" in " ".join(t.notes) for t in grown.value.report.topics)
    # A replication factor the topic does not have is reported, never "ok".
    with pytest.raises(ProvisionError, match="replication is 1, catalog wants 3"):
        await provision(catalog, bootstrap=kafka.bootstrap, replication=3)
    # --check reports drift without touching anything.
    with pytest.raises(ProvisionError) as checked:
        await provision(
            Catalog(prefix=catalog.prefix, partitions=5), bootstrap=kafka.bootstrap, fix=False
        )
    assert checked.value.report is not None
    assert {t.status for t in checked.value.report.topics} == {"drift"}


def cli(
    args: list[str], bootstrap: str, prefix: str, tmp_path: Path, partitions: str = "3"
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFLOW_")}
    env.update(
        {
            "BACKFLOW_KAFKA_BOOTSTRAP": bootstrap,
            "BACKFLOW_KAFKA_TOPIC_PREFIX": prefix,
            "BACKFLOW_KAFKA_PARTITIONS": partitions,
            "BACKFLOW_STATE_DIR": str(tmp_path / "state"),
            "PYTHONPATH": str(REPO),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "backflow.cli", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_exit_status_and_list(kafka: EmbeddedKafka | str, tmp_path: Path) -> None:
    if isinstance(kafka, str):
        pytest.skip("shows the mock broker's refusals")
    prefix = unique("cli")
    failed = cli(["topics", "provision"], kafka.bootstrap, prefix, tmp_path)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"failed   {prefix}.history: " in failed.stdout
    assert "no CreateTopics" in failed.stderr

    listed = cli(["topics", "list"], kafka.bootstrap, prefix, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("broker:  missing") == 5

    await provision(Catalog(prefix=prefix, partitions=3), embedded=kafka)
    ok = cli(["topics", "provision"], kafka.bootstrap, prefix, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("ok       ") == 5
    listed = cli(["topics", "list"], kafka.bootstrap, prefix, tmp_path)
    assert "broker:  partitions=3 replication=1 retention=? cleanup=?" in listed.stdout
    assert "catalog: partitions=3 retention=forever cleanup=delete" in listed.stdout
    assert "no DescribeConfigs" in listed.stdout

    assert "DRIFT" not in listed.stdout
    checked = cli(["topics", "provision", "--check"], kafka.bootstrap, prefix, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The catalog now wants more partitions than the broker has: drift, exit 1.
    wider = cli(["topics", "provision", "--check"], kafka.bootstrap, prefix, tmp_path, "5")
    assert wider.returncode == 1
    assert "partitions is 3, catalog wants 5" in wider.stdout
    listed = cli(["topics", "list"], kafka.bootstrap, prefix, tmp_path, "5")
    assert listed.stdout.count("DRIFT: partitions is 3, catalog wants 5") == 5


def test_demo_names_the_broker_it_uses(tmp_path: Path) -> None:
    state = {"BACKFLOW_STATE_DIR": str(tmp_path)}
    external = load(env={**state, "BACKFLOW_KAFKA_BOOTSTRAP": "kafka-1:9092"})
    assert broker_label(external) == "Kafka at kafka-1:9092"
    mock = {**state, "BACKFLOW_KAFKA_BOOTSTRAP": "127.0.0.1:1", "BACKFLOW_KAFKA_MOCK_BROKER": "1"}
    assert broker_label(load(env=mock)) == "Kafka mock cluster in memory"
    assert broker_label(load(env=state)) == "Kafka mock cluster in memory"


async def test_stack_with_an_external_broker_provisions_through_the_admin_api(
    kafka: EmbeddedKafka | str,
) -> None:
    """`backflow stack up` with BACKFLOW_KAFKA_BOOTSTRAP: the control endpoint takes the
    admin path, which sends the catalog's configs (new_topics, tested above). Here the
    session's mock plays the external broker, so CreateTopics is refused: per topic."""
    if isinstance(kafka, str):
        pytest.skip("the session's mock cluster plays the external broker")
    from aiohttp import web

    from backflow.stack.daemon import _control_app
    from tests.helpers import free_port

    runner = web.AppRunner(_control_app(None, kafka.bootstrap, 3), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    control = f"http://127.0.0.1:{port}"
    catalog = Catalog(prefix=unique("ext"), partitions=3)
    try:
        with pytest.raises(ProvisionError) as refused:
            await provision(catalog, control_url=control)
        report = refused.value.report
        assert report is not None and report.broker == f"Kafka at {kafka.bootstrap}"
        assert all("no CreateTopics" in t.notes[0] for t in report.topics)
        await provision(catalog, embedded=kafka)
        ok = await provision(catalog, control_url=control)
        assert [t.status for t in ok.topics] == ["ok"] * 5
        assert any("no DescribeConfigs" in n for n in ok.notes)
    finally:
        await runner.cleanup()
