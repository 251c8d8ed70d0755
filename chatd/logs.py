"""Structured logs: one JSON object per line on stderr (journald keeps them).

Events are logged as ``log.info("connect", extra={"f": {...}})``; nothing here ever logs a token,
a password or a query string: the callers pass only the fields that are safe.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "f", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup(level: str) -> None:
    """Send every chatd log line to stderr as JSON; quiet the websockets library's own logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # websockets logs handshake failures with tracebacks at error level; we log our own events.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS.get(level.lower(), logging.INFO))
