"""`moxy warm` input handling through click's CliRunner: a list it cannot use stops before any fetch, with one line
(exit 1 for a line, 2 for configuration). Fetching is tested on real servers (tests/integration/test_warm.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from moxy.cli import main
from tests.assets import KEY

# Nothing may be fetched in these tests: an address where a fetch would fail with "error connection", not the
# one-line refusals asserted here.
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("MOXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user key file
    monkeypatch.setenv("MOXY_BASE_URL", NOWHERE)


def run(*args: str, stdin: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["warm", *args], input=stdin, env=env, catch_exceptions=False)


def test_an_unsignable_line_stops_before_any_fetch() -> None:
    result = run("-", stdin="https://example.com/a.png\nnot a url\n", env={"MOXY_KEY": KEY})
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()  # no progress bar: nothing was fetched
    assert line.startswith("moxy: cannot sign 'not a url' (line 2): ")
    assert result.stdout == ""


def test_upstream_urls_need_the_key_and_say_so() -> None:
    result = run("-", stdin="https://example.com/a.png\n")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("moxy: MOXY_KEY") and "line 1 is an upstream URL" in line


def test_an_endpoint_must_be_a_url() -> None:
    result = run("--endpoint", "127.0.0.1:8080", "-", stdin="")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["moxy: --endpoint '127.0.0.1:8080': must start with http:// or https://"]


def test_a_header_needs_a_name_and_a_colon() -> None:
    result = run("-H", "Accept image/png", "-", stdin=f"{NOWHERE}/digest/encoded\n", env={"MOXY_KEY": KEY})
    assert result.exit_code == 2 and "'Name: value'" in result.stderr


def test_an_empty_list_warms_nothing_and_succeeds() -> None:
    result = run("-", stdin="# nothing yet\n\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "0 URLs in 0.0 s, 0 failed"
