"""The logging configuration `moxy serve` hands to uvicorn: its own records (errors, warnings, start and stop) as
the same one-line JSON objects Moxy writes (moxy.telemetry), and the level MOXY_LOG_LEVEL asks for.

uvicorn applies this configuration in every worker process it starts, so the level reaches each of them. Imports
no web framework or server: uvicorn's loggers are named, not imported."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import orjson

from moxy.telemetry import LOG_LEVELS, iso_time

__all__ = ["JsonFormatter", "log_config", "server_level"]


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time (ISO 8601, UTC), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            line["error"] = type(record.exc_info[1]).__name__
            line["traceback"] = "".join(traceback.format_exception(record.exc_info[1]))
        return orjson.dumps(line).decode()


def server_level(level: str) -> str:
    """The level for uvicorn's own loggers: its info records are start-up chatter that Moxy's banner already
    says, so they show only at debug; warnings and errors always show unless the setting is stricter."""
    if level == "debug":
        return "debug"
    return level if LOG_LEVELS[level] > LOG_LEVELS["warning"] else "warning"


def log_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` schema: uvicorn's loggers in JSON on stderr at `server_level(level)`, and the
    "moxy" logger at `level` (moxy.telemetry reads that as the threshold of its own records)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    uvicorn_level = server_level(level).upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": uvicorn_level, "propagate": False},
            "uvicorn.error": {"level": uvicorn_level},
            # Off as `moxy serve` runs it (Moxy writes its own access line); kept quiet should it be turned on.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "moxy": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
        },
    }
