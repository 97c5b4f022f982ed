"""The one settings object: defaults, then a YAML file, then the environment.

Option names follow mautrix where they mean the same thing (``backfill.*``).
Every option ``section.key`` can be overridden by ``BACKFLOW_SECTION_KEY``,
e.g. ``BACKFLOW_BACKFILL_MAX_INITIAL_MESSAGES=100``. ``backflow stack up``
writes ``.backflow/stack.env`` with the addresses of the embedded services;
it is read (below the real environment) when present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from topics.catalog import Catalog

DEFAULT_STATE_DIR = Path(".backflow")
DEFAULT_CONFIG = Path("backflow.yaml")


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str | None = None  # None: the embedded broker of `backflow stack up`
    topic_prefix: str = "backflow"
    partitions: int = 8
    # Copies of every partition `backflow topics provision` asks for: 1 fits a
    # single broker; docs/kafka.md recommends 3 on a production cluster.
    replication_factor: int = 1
    # True only against librdkafka's mock cluster (set by `backflow stack up`
    # and the test fixtures that start it): turns on its workarounds
    # (pipeline/faust_compat.py, delay_leader_sync); off on Apache Kafka.
    mock_broker: bool = False


@dataclass(frozen=True)
class DatabaseSettings:
    url: str | None = None  # None: local 127.0.0.1:5432 if it answers, else embedded
    # True: with no url, always start the embedded server (pgserver) even when
    # 127.0.0.1:5432 answers, e.g. for a harness that stops and starts its own.
    embedded: bool = False


@dataclass(frozen=True)
class HomeserverSettings:
    url: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class AppserviceSettings:
    registration: str | None = None  # path to the appservice registration YAML


@dataclass(frozen=True)
class BackfillSettings:
    """mautrix-compatible backfill options (see README for each)."""

    enabled: bool = True
    max_initial_messages: int = -1  # mautrix default 50; -1: the whole held history
    max_catchup_messages: int = 500
    max_initial_conversations: int = -1


@dataclass(frozen=True)
class SinkSettings:
    max_rooms_in_flight: int = 8
    max_retry_delay_s: float = 60.0  # cap of one backoff step (and of a 429 wait)
    # One homeserver request failing transiently this long ends its round: the
    # command is put back and retried later, never dead-lettered for it.
    give_up_after_s: float = 900.0
    # Media URLs in records are fetched from public addresses only; list the
    # internal hosts or networks you trust, comma-separated ("media.lan,10.2.0.0/16").
    media_allow: str = ""
    media_max_bytes: int = 100 * 1024 * 1024
    media_timeout_s: float = 60.0
    # Per-network ghost / alias naming in mautrix's username_template style,
    # "whatsapp=whatsapp_{id}": backfill as the bridge's own ghosts (docs/sink.md).
    ghost_templates: str = ""
    alias_templates: str = ""


@dataclass(frozen=True)
class IngestSettings:
    listen: str = "127.0.0.1:8480"
    token: str | None = None  # required: `backflow ingest` refuses to start without it
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout_s: float = 10.0  # a connection must finish its request headers in time


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus endpoints (docs/operations.md); a port of 0 leaves that process's off."""

    host: str = "127.0.0.1"
    worker_port: int = 0
    sink_port: int = 0
    ingest_port: int = 0


@dataclass(frozen=True)
class LogSettings:
    format: str = "text"  # "json": one object per line with portal / message id fields


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    homeserver: HomeserverSettings = field(default_factory=HomeserverSettings)
    appservice: AppserviceSettings = field(default_factory=AppserviceSettings)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    sink: SinkSettings = field(default_factory=SinkSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    state_dir: Path = DEFAULT_STATE_DIR

    @property
    def catalog(self) -> Catalog:
        return Catalog(prefix=self.kafka.topic_prefix, partitions=self.kafka.partitions)

    def with_overrides(self, values: dict[str, Any]) -> Settings:
        """A copy with ``{"section.key": value}`` overrides applied (values coerced)."""
        return _apply(self, {k: v for k, v in values.items()}, source="override")


def _coerce(section: str, name: str, current: Any, typ: Any, value: Any, source: str) -> Any:
    where = f"{section}.{name} (from {source})"
    typ = str(typ)
    try:
        if value is None:
            return None
        if "bool" in typ:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in typ:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if "float" in typ:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{where}: cannot use {value!r} as {typ}") from None


def _apply(settings: Settings, flat: dict[str, Any], source: str) -> Settings:
    sections = {f.name: getattr(settings, f.name) for f in fields(settings)}
    for dotted, value in flat.items():
        if dotted == "state_dir":
            sections["state_dir"] = Path(value)
            continue
        section, _, name = dotted.partition(".")
        current = sections.get(section)
        if current is None or not hasattr(current, "__dataclass_fields__"):
            raise SettingsError(f"unknown setting section {section!r} (from {source})")
        spec = {f.name: f for f in fields(current)}.get(name)
        if spec is None:
            known = ", ".join(spec_name for spec_name in current.__dataclass_fields__)
            raise SettingsError(f"unknown setting {dotted!r} (from {source}); known: {known}")
        coerced = _coerce(section, name, getattr(current, name), spec.type, value, source)
        sections[section] = replace(current, **{name: coerced})
    return Settings(**sections)


def _flatten_yaml(data: Any, path: Path) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections")
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if section == "state_dir":
            flat["state_dir"] = values
            continue
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: section {section!r} must be a mapping")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    names = {f.name for f in fields(Settings) if f.name != "state_dir"}
    flat: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith("BACKFLOW_"):
            continue
        rest = key[len("BACKFLOW_") :].lower()
        if rest == "state_dir":
            flat["state_dir"] = value
            continue
        for section in names:
            if rest.startswith(section + "_"):
                flat[f"{section}.{rest[len(section) + 1 :]}"] = value
                break
    return flat


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``export NAME=value`` lines as written by ``backflow stack up``."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        name, _, value = line.partition("=")
        out[name.strip()] = value.strip().strip("'\"")
    return out


# Environment names the stack writes that are not section_key shaped.
KNOWN_ENV = {
    "BACKFLOW_CONFIG",
    "BACKFLOW_EMBEDDED_CONTROL",
}


def load(config: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults < config file < .backflow/stack.env < process environment."""
    env = dict(os.environ if env is None else env)
    path = config or (Path(env["BACKFLOW_CONFIG"]) if env.get("BACKFLOW_CONFIG") else None)
    settings = Settings()
    if path is not None and not path.exists():
        raise SettingsError(f"config file {path} does not exist")
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: invalid YAML: {exc}") from None
        settings = _apply(settings, _flatten_yaml(data, path), source=str(path))
    state_dir = Path(env.get("BACKFLOW_STATE_DIR", settings.state_dir))
    stack_env = read_env_file(state_dir / "stack.env")
    settings = _apply(settings, _env_overrides(stack_env), source=str(state_dir / "stack.env"))
    settings = _apply(settings, _env_overrides(env), source="environment")
    return settings
