"""Logging set-up: plain text locally, JSON lines when deployed."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from services.common.settings import LoggingSettings


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(settings: LoggingSettings, *, service: str) -> None:
    """Route every logger to stderr in the configured format; quiet noisy libraries."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_lines:
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    for noisy in ("aiokafka", "kafka", "asyncio", "httpx", "httpcore", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
