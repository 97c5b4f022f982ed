"""The broker's side of the topic catalog, through Kafka's admin API (aiokafka).

aiokafka 0.14's admin client hands back most broker answers as raw protocol
responses that carry an error code *per topic* instead of raising: a
CreateTopics that fails for every topic still "succeeds". Every answer read
here goes through ``topic_errors`` / ``resource_errors``, which turn those
codes into one error text per topic (None: that topic is fine).

Topic lists always come from an all-topics Metadata request: librdkafka's
mock cluster auto-creates any topic *named* in a Metadata request, which would
hide exactly the missing topics we look for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError, for_code

from topics.bus import BusError
from topics.catalog import TopicSpec

# DescribeConfigs v1+ config_source values (KIP-226).
SOURCE_DYNAMIC_TOPIC = 1
SOURCE_DEFAULT = 5

# The configs the catalog owns (TopicSpec.config()).
MANAGED = ("cleanup.policy", "retention.ms")


class AdminError(BusError):
    """The admin API is unreachable or refused a request as a whole."""


class MissingTopicsError(BusError):
    """A stage was started against a broker that lacks topics it needs."""


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    value: str | None
    overridden: bool  # set on the topic itself, not inherited from the broker default
    read_only: bool
    sensitive: bool


@dataclass(frozen=True, slots=True)
class BrokerTopic:
    """What the broker has for one topic."""

    name: str
    partitions: int
    replication: int
    # None: not known (the broker has no DescribeConfigs, e.g. the mock cluster).
    configs: dict[str, ConfigEntry] | None = None

    def config(self, name: str) -> str | None:
        if self.configs is None or name not in self.configs:
            return None
        return self.configs[name].value


def error_text(code: int, message: str | None = None) -> str:
    """``InvalidReplicationFactorError (38): Replication factor: 3 larger than ...``."""
    name = for_code(code).__name__
    return f"{name} ({code})" + (f": {message}" if message else "")


def topic_errors(response: Any) -> dict[str, str | None]:
    """Per-topic results of a CreateTopics or CreatePartitions response (any version)."""
    out: dict[str, str | None] = {}
    for entry in response.topic_errors:
        topic, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        out[topic] = None if code == 0 else error_text(code, message)
    return out


def resource_errors(responses: Iterable[Any]) -> dict[str, str | None]:
    """Per-resource results of AlterConfigs / DescribeConfigs responses (any version)."""
    out: dict[str, str | None] = {}
    for response in responses:
        for entry in response.resources:
            code, message, name = entry[0], entry[1], entry[3]
            out[name] = None if code == 0 else error_text(code, message)
    return out


def described_configs(responses: Iterable[Any]) -> dict[str, dict[str, ConfigEntry] | str]:
    """Each topic's configs from DescribeConfigs responses, or its error text."""
    errors = resource_errors(responses)
    out: dict[str, dict[str, ConfigEntry] | str] = {}
    for response in responses:
        version = response.API_VERSION
        for entry in response.resources:
            name = entry[3]
            if errors.get(name):
                out[name] = errors[name]  # type: ignore[assignment]
                continue
            configs: dict[str, ConfigEntry] = {}
            for item in entry[4]:
                key, value, read_only, flag, sensitive = item[:5]
                # v0 says is_default; v1+ says where the value comes from.
                overridden = (not flag) if version == 0 else flag == SOURCE_DYNAMIC_TOPIC
                configs[key] = ConfigEntry(value, overridden, read_only, sensitive)
            out[name] = configs
    return out


def merged_configs(topic: BrokerTopic, wanted: dict[str, str]) -> dict[str, str]:
    """The full config set to send with AlterConfigs: the topic's own overrides, then ours.

    (Non-incremental) AlterConfigs replaces *every* topic config: sending only
    ours would reset whatever else an operator set on the topic.
    """
    keep: dict[str, str] = {}
    for key, entry in (topic.configs or {}).items():
        if entry.overridden and not entry.read_only and entry.value is not None:
            keep[key] = entry.value
    keep.update(wanted)
    return keep


async def open_admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        await admin.start()
    except Exception as exc:  # aiokafka raises several unrelated types here
        await admin.close()
        raise AdminError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
    return admin


async def broker_topics(admin: AIOKafkaAdminClient) -> dict[str, BrokerTopic]:
    """Every topic on the broker with its partition count and replication factor."""
    try:
        described = await admin.describe_topics(None)  # None: all topics, creates nothing
    except KafkaError as exc:
        raise AdminError(f"cannot list the broker's topics: {exc}") from None
    out: dict[str, BrokerTopic] = {}
    for topic in described:
        if topic["error_code"] != 0:
            continue
        partitions = topic["partitions"]
        replication = min((len(p["replicas"]) for p in partitions), default=0)
        out[topic["topic"]] = BrokerTopic(topic["topic"], len(partitions), replication)
    return out


async def with_configs(
    admin: AIOKafkaAdminClient, topics: dict[str, BrokerTopic]
) -> tuple[dict[str, BrokerTopic], dict[str, str]]:
    """``topics`` with their configs filled in, and per-topic errors.

    On a broker without DescribeConfigs (the mock cluster) the configs stay
    None and the error dict says so once under the key ``""``.
    """
    if not topics:
        return topics, {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics]
    try:
        responses = await admin.describe_configs(resources)
    except IncompatibleBrokerVersion:
        return topics, {"": "the broker has no DescribeConfigs (librdkafka's mock cluster?)"}
    except KafkaError as exc:
        return topics, {"": f"DescribeConfigs failed: {exc}"}
    out = dict(topics)
    errors: dict[str, str] = {}
    for name, configs in described_configs(responses).items():
        if name not in out:
            continue
        if isinstance(configs, str):
            errors[name] = configs
        else:
            old = out[name]
            out[name] = BrokerTopic(old.name, old.partitions, old.replication, configs)
    return out, errors


def new_topics(specs: list[TopicSpec], replication: int) -> list[NewTopic]:
    """CreateTopics entries with the catalog's configs: without them Kafka's
    defaults apply (7 days of retention), and the log replay needs is deleted."""
    return [NewTopic(s.name, s.partitions, replication, topic_configs=s.config()) for s in specs]


async def create_topics(
    admin: AIOKafkaAdminClient, specs: list[TopicSpec], replication: int
) -> dict[str, str | None]:
    """Create ``specs`` with their configs; the error text per topic (None: created)."""
    try:
        response = await admin.create_topics(new_topics(specs, replication))
    except IncompatibleBrokerVersion:
        reason = "the broker has no CreateTopics (librdkafka's mock cluster?)"
        return {s.name: reason for s in specs}
    except KafkaError as exc:
        return {s.name: f"CreateTopics failed: {exc}" for s in specs}
    results = topic_errors(response)
    # A topic the broker did not answer for was not created either.
    return {s.name: results.get(s.name, "no answer from the broker") for s in specs}


async def add_partitions(admin: AIOKafkaAdminClient, name: str, total: int) -> str | None:
    """Grow ``name`` to ``total`` partitions; the error text or None."""
    try:
        # aiokafka raises on this response's error codes (unlike CreateTopics).
        await admin.create_partitions({name: NewPartitions(total)})
    except IncompatibleBrokerVersion:
        return "the broker has no CreatePartitions (librdkafka's mock cluster?)"
    except KafkaError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def alter_configs(
    admin: AIOKafkaAdminClient, name: str, configs: dict[str, str]
) -> str | None:
    """Set the topic's whole config to ``configs``; the error text or None."""
    resource = ConfigResource(ConfigResourceType.TOPIC, name, configs)
    try:
        responses = await admin.alter_configs([resource])
    except IncompatibleBrokerVersion:
        return "the broker has no AlterConfigs (librdkafka's mock cluster?)"
    except KafkaError as exc:
        return f"AlterConfigs failed: {exc}"
    return resource_errors(responses).get(name, "no answer from the broker")


async def missing_topics(bootstrap: str, names: Iterable[str]) -> list[str]:
    """Which of ``names`` the broker at ``bootstrap`` does not have."""
    admin = await open_admin(bootstrap)
    try:
        present = await broker_topics(admin)
    finally:
        await admin.close()
    return [name for name in names if name not in present]


async def require_topics(bootstrap: str, names: Iterable[str], who: str) -> None:
    """Raise MissingTopicsError naming every topic ``who`` needs that the broker lacks.

    Without this a consumer of missing topics joins its group, owns no
    partitions and idles without a word (Apache Kafka with auto-create off).
    """
    missing = await missing_topics(bootstrap, list(names))
    if missing:
        raise MissingTopicsError(
            f"{who}: topics missing on the Kafka broker at {bootstrap}: {', '.join(missing)}; "
            "create them with `backflow topics provision`"
        )
