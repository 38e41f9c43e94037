"""`moxy warm` through click's CliRunner: how it reads its list (a line it cannot sign is a failed line; an upstream
URL with no key stops it, exit 2), how it counts and shows outcomes. Fetching is tested on real servers
(tests/integration/test_warm.py, and test_warm_bounds.py for hostile endpoints and long lists)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from moxy.cli import _CACHE_RESULTS, _count_urls, _printable, _Tally, _Warmed, main
from moxy.proxy import CacheResult
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


def warming(result: Result) -> list[str]:
    """stderr without the progress bar's label (all click prints of it when stderr is no terminal)."""
    lines = result.stderr.splitlines()
    assert lines[0] == "warming", result.stderr
    return lines[1:]


def test_a_line_it_cannot_sign_is_a_failed_line_and_the_others_go_on() -> None:
    stdin = "# a list\nnot a url\n\nhttps://example.com/a.png\nhttp://\x1b[2Jwhat\n"
    result = run("-", stdin=stdin, env={"MOXY_KEY": KEY})
    assert result.exit_code == 1
    assert result.stdout.splitlines()[:2] == ["error connection  1", "error unusable    2"]
    assert result.stdout.splitlines()[-1].endswith(" s, 3 failed")
    errors = warming(result)
    assert errors[0].startswith("moxy: error unusable: not a url (cannot sign: ")
    assert errors[1].startswith("moxy: error connection: https://example.com/a.png (")  # nothing listens there
    assert errors[2].startswith("moxy: error unusable: http://\\x1b[2Jwhat (cannot sign: ")  # escaped, by line


def test_an_upstream_url_without_a_key_stops_there_with_exit_2() -> None:
    result = run("-", stdin="\nhttps://example.com/a.png\nhttps://example.com/b.png\n")
    assert result.exit_code == 2
    assert result.stdout == "0 URLs in 0.0 s, 0 failed\n"  # stopped at the first line it needed the key for
    (line,) = warming(result)
    assert line.startswith("moxy: MOXY_KEY") and "(line 2 is an upstream URL, which warm signs first)" in line


def test_the_lines_before_a_missing_key_are_warmed_first() -> None:
    # Moxy URLs need no key: fetched (and failed: nothing listens), then the upstream URL stops the run.
    stdin = f"{NOWHERE}/digest/one\n{NOWHERE}/digest/two\nhttps://example.com/a.png\n{NOWHERE}/digest/three\n"
    result = run("--concurrency", "1", "-", stdin=stdin)
    assert result.exit_code == 2
    assert result.stdout.splitlines() == ["error connection  2", result.stdout.splitlines()[1]]
    assert result.stdout.splitlines()[1].endswith(", 2 failed")
    assert "(line 3 is an upstream URL" in warming(result)[-1]


def test_input_that_is_not_utf8_stops_the_list_with_exit_1() -> None:
    result = CliRunner().invoke(main, ["warm", "-"], input=b"\xff\xfe not text\n", catch_exceptions=False)
    assert result.exit_code == 1
    assert warming(result)[-1] == "moxy: cannot read the list: not UTF-8 (invalid start byte)"
    stdin = b"not a url\n" * 2000 + b"\xff\n"  # past the first block of what is decoded at once
    result = CliRunner().invoke(main, ["warm", "-"], input=stdin, env={"MOXY_KEY": KEY}, catch_exceptions=False)
    assert result.exit_code == 1
    assert re.fullmatch(
        r"moxy: cannot read the list after line \d+: not UTF-8 \(invalid start byte\)", warming(result)[-1]
    )
    assert "error unusable  " in result.stdout  # the lines before it counted


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


def test_the_failures_shown_are_the_first_by_line_and_the_rest_counted() -> None:
    result = run("-", stdin="".join(f"bad url {number}\n" for number in range(1, 31)), env={"MOXY_KEY": KEY})
    assert result.exit_code == 1
    errors = warming(result)
    assert [line.split(" (")[0] for line in errors[:-1]] == [
        f"moxy: error unusable: bad url {number}" for number in range(1, 21)
    ]
    assert errors[-1] == "moxy: ... and 10 more failed"


def test_a_list_in_a_file_gives_the_bar_its_length(tmp_path: Path) -> None:
    listed = tmp_path / "urls.txt"
    listed.write_text("# two URLs\nnot a url\n\nhttp://\n")
    with listed.open(encoding="utf-8") as source:
        assert _count_urls(source) == 2
        assert source.readline() == "# two URLs\n"  # and back at its start, for the pass that fetches
    result = CliRunner().invoke(main, ["warm", str(listed)], env={"MOXY_KEY": KEY}, catch_exceptions=False)
    assert result.exit_code == 1 and "2 URLs in " in result.stdout


def test_a_pipe_has_no_length() -> None:
    reading, writing = os.pipe()
    os.close(writing)
    with open(reading, encoding="utf-8") as source:
        assert _count_urls(source) is None


def test_the_known_cache_results_are_moxys() -> None:
    # The CLI keeps its own copy (importing moxy.proxy would load the upstream engine into the command).
    assert set(_CACHE_RESULTS) == {result.value for result in CacheResult}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param("upstream-status-404", "upstream-status-404", id="plain"),
        pytest.param("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c", id="printable-unicode"),
        pytest.param("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m", id="csi"),
        pytest.param("\x1b]0;title\x07", "\\x1b]0;title\\x07", id="osc-bel"),
        pytest.param("a\rb\nc\td", "a\\rb\\nc\\td", id="cr-lf-tab"),
        pytest.param("\u202eevil", "\\u202eevil", id="bidi-override"),
        pytest.param("\x7f\x85", "\\x7f\\x85", id="del-and-c1"),
        pytest.param("x" * 301, "x" * 300 + "...", id="long"),
        pytest.param("\x00" * 300, "\\x00" * 75 + "...", id="long-once-escaped"),
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert _printable(text) == shown
    assert _printable(text).isprintable()


def test_tally_keeps_the_first_failures_by_line_whatever_order_they_finish_in() -> None:
    tally = _Tally()
    for line in [50, 3, 99, 1, 7, *range(100, 130), 2]:
        tally.add(_Warmed(line, f"u{line}", "error 502"))
    tally.add(_Warmed(4, "u4", "HIT"))
    assert [each.line for each in tally.failures] == [1, 2, 3, 7, 50, 99, *range(100, 114)]
    assert (tally.failed, tally.counts) == (36, {"error 502": 36, "HIT": 1})
