"""The one log formatter of every process: text or JSON lines, secrets masked.

``log.format: json`` (``BACKFLOW_LOG_FORMAT=json``) writes one JSON object per
line; a line about one portal or message carries ``portal`` / ``message_id``
(and ``room_id``) fields, passed as ``extra=fields(portal=..., message=...)``.
Whatever the format, the values of known secrets (appservice and ingest
tokens, the database password) are replaced by ``***`` in the finished line.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from topics.settings import Settings, SettingsError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("portal", "message_id", "room_id")
_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Mask ``value`` in every log line from now on (tokens read after startup)."""
    if value and len(value) >= 4:  # a tiny "secret" would mask ordinary words
        _secrets.add(value)


def fields(portal: str | None = None, message: str | None = None, room: str | None = None) -> dict:
    """``extra=`` for a log call about one portal / message / room."""
    out = {"portal": portal, "message_id": message, "room_id": room}
    return {k: v for k, v in out.items() if v is not None}


def _mask(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


class Formatter(logging.Formatter):
    def __init__(self, json: bool) -> None:
        super().__init__(TEXT_FORMAT)
        self.json = json

    def format(self, record: logging.LogRecord) -> str:
        if not self.json:
            return _mask(super().format(record))
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _mask(orjson.dumps(out).decode())


def setup_logging(settings: Settings, level: int | str | None = logging.INFO) -> None:
    """Install the formatter on the root handlers (adding one on stderr if none).

    The pipeline worker calls it with ``level=None`` after faust configured
    its own handlers and level: only the formatters change then.
    """
    fmt = settings.log.format.strip().lower()
    if fmt not in ("text", "json"):
        raise SettingsError(f"log.format: {settings.log.format!r} is not 'text' or 'json'")
    add_secret(settings.ingest.token)
    if settings.database.url:
        add_secret(urlsplit(settings.database.url).password)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    if level is not None:
        root.setLevel(level)
    for handler in root.handlers:
        handler.setFormatter(Formatter(json=fmt == "json"))
