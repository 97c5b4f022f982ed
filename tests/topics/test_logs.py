"""The shared log formatter: JSON fields, secrets masked in both formats, settings."""

from __future__ import annotations

import io
import json
import logging

import pytest

from topics import logs
from topics.logs import Formatter, add_secret, fields, setup_logging
from topics.settings import Settings, SettingsError, load


def _line(formatter: logging.Formatter, msg: str, *args: object, **extra: object) -> str:
    record = logging.LogRecord("backflow.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return formatter.format(record)


def test_json_lines_carry_portal_message_and_room_fields() -> None:
    line = _line(
        Formatter(json=True), "portal %s: sent %s", "wa:chat", "m1", **fields("wa:chat", "m1", "!r")
    )
    data = json.loads(line)
    assert data["msg"] == "portal wa:chat: sent m1" and data["level"] == "WARNING"
    assert (data["portal"], data["message_id"], data["room_id"]) == ("wa:chat", "m1", "!r")
    plain = json.loads(_line(Formatter(json=True), "no portal here"))
    assert "portal" not in plain and "message_id" not in plain


def test_secrets_from_settings_are_masked_in_json_and_text(monkeypatch) -> None:
    monkeypatch.setattr(logs, "_secrets", set())
    root = logging.getLogger()
    saved = root.handlers[:]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.handlers[:] = [handler]
    try:
        settings = Settings().with_overrides(
            {
                "ingest.token": "tok-ingest-123",
                "database.url": "postgresql://backflow:pg-pass-456@db:5432/backflow",
                "log.format": "json",
            }
        )
        setup_logging(settings, level=None)
        add_secret("as-token-789")  # what the sink adds after reading its registration
        log = logging.getLogger("backflow.test")
        log.warning(
            "url %s token %s as %s", settings.database.url, "tok-ingest-123", "as-token-789"
        )
        data = json.loads(stream.getvalue().splitlines()[-1])
        assert data["msg"] == "url postgresql://backflow:***@db:5432/backflow token *** as ***"
        setup_logging(settings.with_overrides({"log.format": "text"}), level=None)
        log.warning("again %s", "pg-pass-456")
        last = stream.getvalue().splitlines()[-1]
        assert last.endswith("WARNING backflow.test: again ***"), last
        assert "pg-pass-456" not in stream.getvalue() and "tok-ingest-123" not in stream.getvalue()
    finally:
        root.handlers[:] = saved


def test_log_format_and_metrics_ports_are_settings() -> None:
    env = {
        "BACKFLOW_LOG_FORMAT": "json",
        "BACKFLOW_METRICS_SINK_PORT": "9402",
        "BACKFLOW_METRICS_HOST": "0.0.0.0",
    }
    settings = load(env=env)
    assert settings.log.format == "json" and settings.metrics.sink_port == 9402
    assert settings.metrics.host == "0.0.0.0" and settings.metrics.worker_port == 0
    with pytest.raises(SettingsError, match="log.format"):
        setup_logging(Settings().with_overrides({"log.format": "xml"}))
    with pytest.raises(SettingsError, match="metrics.ingest_port"):
        load(env={"BACKFLOW_METRICS_INGEST_PORT": "many"})
