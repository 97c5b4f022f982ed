"""Make the broker match the catalog, topic by topic, and say what happened to each.

Three ways to reach a broker, one report:

- Apache Kafka (``bootstrap``): the admin API. Missing topics are created
  with the catalog's configs and the replication factor setting; existing
  ones are compared with the catalog (partitions, replication,
  ``cleanup.policy``, ``retention.ms``). What Kafka allows is fixed (more
  partitions, altered configs); what it does not (fewer partitions, another
  replication factor) is a failure to act on.
- The embedded mock broker in this process (``embedded``) or in the
  ``backflow stack up`` daemon (``control_url``): librdkafka's mock cluster
  has no CreateTopics and no configs, so topics are created in the process
  that owns it and only partition counts can be compared.

``provision`` raises ProvisionError, carrying the report, when any topic
failed, so no caller can mistake a failed provisioning for a good one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp

from topics import admin as kafka_admin
from topics.admin import BrokerTopic
from topics.catalog import Catalog, TopicSpec

CREATED, OK, FIXED, DRIFT, FAILED = "created", "ok", "fixed", "drift", "failed"

MOCK_NOTE = (
    "the embedded mock broker keeps no topic configs: retention and cleanup.policy "
    "apply on Apache Kafka only"
)


class ProvisionError(RuntimeError):
    """Provisioning failed; ``report`` (when set) says what happened to every topic."""

    def __init__(self, message: str, report: ProvisionReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class TopicCreator(Protocol):
    """The in-process mock cluster (backflow.stack.kafka.EmbeddedKafka)."""

    def create_topic(self, name: str, partitions: int, replication: int = 1) -> None: ...

    def partition_counts(self) -> dict[str, int]: ...


@dataclass(slots=True)
class TopicResult:
    name: str
    status: str  # created | ok | fixed | drift (only with fix=False) | failed
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in (CREATED, OK, FIXED)


@dataclass(slots=True)
class ProvisionReport:
    broker: str
    topics: list[TopicResult]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.topics)

    @property
    def failed(self) -> list[TopicResult]:
        return [t for t in self.topics if not t.ok]

    def lines(self) -> list[str]:
        out = []
        for t in self.topics:
            out.append(f"{t.status:8} {t.name}" + (f": {'; '.join(t.notes)}" if t.notes else ""))
        out += [f"note: {n}" for n in self.notes]
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProvisionReport:
        topics = [TopicResult(t["name"], t["status"], list(t["notes"])) for t in data["topics"]]
        return cls(str(data["broker"]), topics, list(data.get("notes", [])))


@dataclass(frozen=True, slots=True)
class Drift:
    what: str
    have: str
    want: str
    fixable: bool

    def __str__(self) -> str:
        return f"{self.what} is {self.have}, catalog wants {self.want}"


def drift(spec: TopicSpec, topic: BrokerTopic, replication: int | None) -> list[Drift]:
    """How ``topic`` on the broker differs from ``spec`` (configs only when known)."""
    out = []
    if topic.partitions < spec.partitions:
        out.append(Drift("partitions", str(topic.partitions), str(spec.partitions), True))
    elif topic.partitions > spec.partitions:
        # Kafka cannot remove partitions; keys would move anyway.
        out.append(Drift("partitions", str(topic.partitions), str(spec.partitions), False))
    if replication is not None and topic.replication != replication:
        # Needs a partition reassignment (kafka-reassign-partitions.sh), not an admin call.
        out.append(Drift("replication", str(topic.replication), str(replication), False))
    if topic.configs is not None:
        for key, want in spec.config().items():
            have = topic.config(key)
            if have != want:
                out.append(Drift(key, str(have), want, True))
    return out


async def provision(
    catalog: Catalog,
    *,
    bootstrap: str | None = None,
    control_url: str | None = None,
    embedded: TopicCreator | None = None,
    replication: int = 1,
    fix: bool = True,
) -> ProvisionReport:
    """Create the catalog's topics and fix drift; raise ProvisionError on any failure.

    ``fix=False`` only reports: drift is then a failure too (``--check``).
    """
    if replication < 1:
        raise ProvisionError(f"kafka.replication_factor must be >= 1, got {replication}")
    if embedded is not None:
        report = provision_embedded(catalog.specs(), embedded, replication, fix)
    elif control_url:
        report = await _provision_via_control(catalog, control_url, replication, fix)
    elif bootstrap:
        report = await provision_admin(catalog.specs(), bootstrap, replication, fix)
    else:
        raise ProvisionError("no broker: set BACKFLOW_KAFKA_BOOTSTRAP or run `backflow stack up`")
    if not report.ok:
        names = ", ".join(t.name for t in report.failed)
        first = "; ".join(report.failed[0].notes)
        raise ProvisionError(f"provisioning failed for {names} ({first})", report)
    return report


def provision_embedded(
    specs: list[TopicSpec], kafka: TopicCreator, replication: int, fix: bool = True
) -> ProvisionReport:
    """On the mock cluster in this process: create what is missing, compare partition counts."""
    existing = kafka.partition_counts()
    results = []
    for spec in specs:
        have = existing.get(spec.name)
        if have is None and not fix:
            results.append(TopicResult(spec.name, DRIFT, ["missing"]))
        elif have is None:
            try:
                kafka.create_topic(spec.name, spec.partitions, replication)
            except Exception as exc:  # noqa: BLE001 - reported per topic
                results.append(TopicResult(spec.name, FAILED, [str(exc)]))
                continue
            results.append(TopicResult(spec.name, CREATED, [f"{spec.partitions} partitions"]))
        elif have != spec.partitions:
            note = (
                f"partitions is {have}, catalog wants {spec.partitions}; "
                "the mock broker cannot change a topic (restart the stack)"
            )
            results.append(TopicResult(spec.name, FAILED, [note]))
        else:
            results.append(TopicResult(spec.name, OK))
    return ProvisionReport("embedded mock broker", results, [MOCK_NOTE])


async def _provision_via_control(
    catalog: Catalog, control_url: str, replication: int, fix: bool
) -> ProvisionReport:
    body = {
        "prefix": catalog.prefix,
        "partitions": catalog.partitions,
        "replication": replication,
        "fix": fix,
    }
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{control_url}/topics", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status not in (200, 409) or "topics" not in data:
                    raise ProvisionError(f"embedded stack refused: {data.get('error', data)}")
    except (aiohttp.ClientError, ValueError) as exc:
        raise ProvisionError(f"embedded stack not reachable at {control_url}: {exc}") from None
    return ProvisionReport.from_json(data)


async def provision_admin(
    specs: list[TopicSpec], bootstrap: str, replication: int, fix: bool = True
) -> ProvisionReport:
    """On a broker with the admin API (Apache Kafka): create, compare, fix."""
    admin = await kafka_admin.open_admin(bootstrap)
    try:
        return await _provision_admin(admin, specs, bootstrap, replication, fix)
    finally:
        await admin.close()


async def _provision_admin(
    admin: Any, specs: list[TopicSpec], bootstrap: str, replication: int, fix: bool
) -> ProvisionReport:
    report = ProvisionReport(f"Kafka at {bootstrap}", [])
    existing = await kafka_admin.broker_topics(admin)
    missing = [s for s in specs if s.name not in existing]
    results: dict[str, TopicResult] = {}
    if missing and fix:
        created = await kafka_admin.create_topics(admin, missing, replication)
        for spec in missing:
            error = created[spec.name]
            if error is None:
                note = f"{spec.partitions} partitions, replication {replication}"
                results[spec.name] = TopicResult(spec.name, CREATED, [note])
            elif not error.startswith("TopicAlreadyExistsError"):
                results[spec.name] = TopicResult(spec.name, FAILED, [error])
        if len(results) < len(missing):  # some appeared meanwhile: compare them too
            existing = await kafka_admin.broker_topics(admin)
    else:
        for spec in missing:
            results[spec.name] = TopicResult(spec.name, FAILED if fix else DRIFT, ["missing"])
    present = {s.name: existing[s.name] for s in specs if s.name not in results}
    present, config_errors = await kafka_admin.with_configs(admin, present)
    if "" in config_errors:
        report.notes.append(f"configs not compared: {config_errors['']}")
    for spec in specs:
        if spec.name in results:
            continue
        topic = present[spec.name]
        error = config_errors.get(spec.name)
        notes = [f"configs not compared: {error}"] if error else []
        results[spec.name] = await _reconcile(admin, spec, topic, replication, fix, notes)
    report.topics = [results[s.name] for s in specs]
    return report


async def _reconcile(
    admin: Any, spec: TopicSpec, topic: BrokerTopic, replication: int, fix: bool, notes: list[str]
) -> TopicResult:
    drifts = drift(spec, topic, replication)
    if not drifts:
        return TopicResult(spec.name, OK, notes)
    if not fix:
        return TopicResult(spec.name, DRIFT, notes + [str(d) for d in drifts])
    failed = False
    for d in drifts:
        if not d.fixable:
            notes.append(f"{d}: Kafka cannot change this in place")
            failed = True
    if any(d.what == "partitions" and d.fixable for d in drifts):
        error = await kafka_admin.add_partitions(admin, spec.name, spec.partitions)
        if error:
            notes.append(f"adding partitions failed: {error}")
            failed = True
        else:
            notes.append(f"partitions {topic.partitions} -> {spec.partitions}")
    config_drift = [d for d in drifts if d.what in kafka_admin.MANAGED]
    if config_drift:
        configs = kafka_admin.merged_configs(topic, spec.config())
        error = await kafka_admin.alter_configs(admin, spec.name, configs)
        if error:
            notes.append(f"altering configs failed: {error}")
            failed = True
        else:
            notes += [f"{d.what} {d.have} -> {d.want}" for d in config_drift]
    return TopicResult(spec.name, FAILED if failed else FIXED, notes)


@dataclass(frozen=True, slots=True)
class TopicState:
    """One catalog topic beside what the broker has (``topics list``)."""

    spec: TopicSpec
    broker: BrokerTopic | None  # None: missing
    drift: list[Drift]


async def describe(
    catalog: Catalog, bootstrap: str, replication: int
) -> tuple[list[TopicState], list[str]]:
    """The catalog beside the broker's topics, and notes (configs unknown on the mock)."""
    admin = await kafka_admin.open_admin(bootstrap)
    try:
        existing = await kafka_admin.broker_topics(admin)
        specs = catalog.specs()
        present = {s.name: existing[s.name] for s in specs if s.name in existing}
        present, errors = await kafka_admin.with_configs(admin, present)
    finally:
        await admin.close()
    notes = [f"configs not shown: {errors['']}"] if "" in errors else []
    notes += [f"{name}: configs not shown: {e}" for name, e in errors.items() if name]
    states = []
    for spec in specs:
        topic = present.get(spec.name)
        states.append(TopicState(spec, topic, drift(spec, topic, replication) if topic else []))
    return states, notes
