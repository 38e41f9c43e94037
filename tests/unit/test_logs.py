"""Log lines: ISO 8601 times, the level threshold, the client address, and uvicorn's records in the same JSON
(moxy.logs, moxy.telemetry)."""

from __future__ import annotations

import logging
import logging.config
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest

from moxy.config import load_settings
from moxy.errors import ConfigError
from moxy.logs import JsonFormatter, log_config, server_level
from moxy.telemetry import DiskReport, Metrics, iso_time, log_access, write_record

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
TOUCHED = ("moxy", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def restore_loggers() -> Iterator[None]:
    """dictConfig changes process-wide loggers; put back what the configuration touches."""
    saved = {name: logging.getLogger(name) for name in TOUCHED}
    state = {name: (lg.level, list(lg.handlers), lg.propagate) for name, lg in saved.items()}
    yield
    for name, lg in saved.items():
        lg.level, lg.handlers, lg.propagate = state[name][0], state[name][1], state[name][2]


def lines(text: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("at", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.5, "2023-11-14T22:13:20.500Z"),
        (1_700_000_000.9999, "2023-11-14T22:13:20.999Z"),  # cut, never rounded into the next second
    ],
)
def test_iso_time(at: float, text: str) -> None:
    assert iso_time(at) == text
    assert datetime.fromisoformat(text).tzinfo is not None


def test_iso_time_now_is_now() -> None:
    text = iso_time()
    assert ISO.match(text)
    assert abs(datetime.fromisoformat(text).timestamp() - datetime.now(UTC).timestamp()) < 5


def test_access_line_has_time_level_and_client(capsys: pytest.CaptureFixture[str]) -> None:
    log_access("GET", "/abc/def", 200, "HIT", None, None, None, 10, 0.0, client=("192.0.2.7", 50123))
    log_access("GET", "/abc/def", 200, "HIT", None, None, None, 10, 0.0)
    first, second = lines(capsys.readouterr().err)
    assert ISO.match(str(first["time"])) and first["level"] == "info"
    assert first["client"] == "192.0.2.7"
    assert second["client"] is None
    assert "/abc/def" not in str(first)


def test_level_threshold_is_the_moxy_loggers(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("moxy").setLevel(logging.WARNING)
    log_access("GET", "/p", 200, "MISS", None, 200, 0.01, 1, 0.0)
    write_record({"level": "debug", "event": "x"})
    report = DiskReport(Metrics())
    report.changed(None, "put", None)  # recovered: info
    report.changed("ENOSPC", "put", OSError(28, "No space left on device"))  # failed: warning
    written = lines(capsys.readouterr().err)
    assert [record.get("event") for record in written] == ["cache-dir-failed"]


def test_unconfigured_every_record_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("moxy").setLevel(logging.NOTSET)
    write_record({"level": "debug", "event": "x"})
    log_access("GET", "/p", 200, "MISS", None, 200, 0.01, 1, 0.0)
    assert len(lines(capsys.readouterr().err)) == 2


def test_uvicorn_records_become_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    logging.config.dictConfig(log_config("info"))
    server = logging.getLogger("uvicorn.error")
    server.info("Started server process")  # chatter: shown only at debug
    server.warning("Invalid HTTP request received.")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        server.exception("Exception in ASGI application")
    written = lines(capsys.readouterr().err)
    assert [record["level"] for record in written] == ["warning", "error"]
    warning, error = written
    assert warning["logger"] == "uvicorn.error" and warning["message"] == "Invalid HTTP request received."
    assert ISO.match(str(warning["time"]))
    assert error["error"] == "RuntimeError"
    # tests/integration/moxy_server.py finds faults by these words; JSON keeps them on one line.
    assert "Traceback (most recent call last)" in str(error["traceback"])
    assert logging.getLogger("moxy").level == logging.INFO


def test_debug_shows_uvicorns_info(capsys: pytest.CaptureFixture[str]) -> None:
    logging.config.dictConfig(log_config("debug"))
    logging.getLogger("uvicorn.error").info("Started server process")
    assert [record["message"] for record in lines(capsys.readouterr().err)] == ["Started server process"]


@pytest.mark.parametrize(
    ("moxy", "uvicorn"),
    [("debug", "debug"), ("info", "warning"), ("warning", "warning"), ("error", "error"), ("critical", "critical")],
)
def test_server_level(moxy: str, uvicorn: str) -> None:
    assert server_level(moxy) == uvicorn
    assert log_config(moxy)["loggers"]["uvicorn"]["level"] == uvicorn.upper()
    assert log_config(moxy)["loggers"]["moxy"]["level"] == moxy.upper()


def test_log_config_refuses_an_unknown_level() -> None:
    with pytest.raises(ValueError, match="loud"):
        log_config("loud")


def test_formatter_without_exception_has_no_traceback() -> None:
    record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    line = orjson.loads(JsonFormatter().format(record))
    assert line["message"] == "a b" and "traceback" not in line


@pytest.mark.parametrize(("given", "level"), [("WARNING", "warning"), (" Error ", "error"), ("debug", "debug")])
def test_log_level_setting(monkeypatch: pytest.MonkeyPatch, given: str, level: str) -> None:
    monkeypatch.setenv("MOXY_LOG_LEVEL", given)
    assert load_settings().log_level == level


def test_log_level_setting_refuses_a_word_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="MOXY_LOG_LEVEL"):
        load_settings()
