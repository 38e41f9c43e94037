"""The README's quick start, run as written: `make run` from its first shell block, then every command of the first
shell block that signs from the checkout (`.venv/bin/moxy sign ...`), from a fresh folder, against a real upstream
on loopback.

What the README must keep for this to pass (the test names the rule it finds broken):
- a ```sh block with a line `make run` (other lines of that block, such as `make test`, are not run here);
- a ```sh block whose commands use `.venv/bin/moxy sign`, runnable one after the other from the checkout once
  `make run` serves: `export NAME=VALUE` lines are kept for the lines after them, example upstream URLs are on
  `https://example.com/`, a Moxy URL to verify is written `http://127.0.0.1:8080/<digest>/<encoded>`, a list of
  URLs is read from `urls.txt` (by `moxy sign -` or `moxy warm`); no other `<placeholder>`, and no command that needs
  a setting `make run` does not make (`moxy purge` needs MOXY_PURGE_TOKEN).

The test's only departures: the state folder (`STATE`) and the port (`MOXY_PORT`) are this test's, `make` does not
reinstall the venv it runs in (`-o`), and example URLs are replaced by URLs of the loopback upstream. `make clean`
is run too, in a folder of its own, to show it keeps the key."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.assets import PNG
from tests.integration.origin import Origin, Reply
from tests.integration.servers import wait_until_healthy
from tests.net import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV = Path(sys.prefix)  # the venv running the tests, which `make test` made with everything `make run` installs
EXAMPLE = "https://example.com/"
PLACEHOLDER = "http://127.0.0.1:8080/<digest>/<encoded>"
START_SECONDS = 30
STOP_SECONDS = 45  # SIGTERM drains for up to 30 s before Moxy exits (moxy/supervisor.py)


def shell_blocks() -> list[list[str]]:
    """The commands of each ```sh block of the README: comments dropped, continuation lines joined."""
    blocks = re.findall(r"^```(?:sh|bash|console)\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    found = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        commands = [re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip() for line in joined.splitlines()]
        found.append([command for command in commands if command])
    return found


def quick_start() -> tuple[str, list[str]]:
    """(the `make run` line, the commands of the signing block)."""
    blocks = shell_blocks()
    make_run = next((c for block in blocks for c in block if re.fullmatch(r"make run\b.*", c)), None)
    assert make_run is not None, "README.md: no ```sh block with a `make run` line (the quick start)"
    # The checkout's commands (`.venv/bin/moxy sign`), not those of an installed Moxy (`pip install`, `moxy sign`).
    signing = next((block for block in blocks if any(re.search(r"\.venv/bin/moxy sign\b", c) for c in block)), None)
    assert signing is not None, "README.md: no ```sh block with `.venv/bin/moxy sign` (the quick start's signing)"
    return make_run, signing


@pytest.fixture
def served(origin: Origin, tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], str]]:
    """`make run` as the README says, its state in this test's folder: (that folder, the environment, the base URL)."""
    make_run, _ = quick_start()
    assert (VENV / "bin" / "moxy").exists(), f"the tests run outside the project's venv ({VENV}): no moxy command"
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)  # the README's `.venv/bin/moxy`, from this folder
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MOXY_", "PYTHON"))}
    env |= {
        "MOXY_PORT": str(port),
        "MOXY_ALLOWED_NETWORKS": "127.0.0.0/8",  # the upstream of this test is on loopback
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "home" / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "home" / "cache"),
    }
    command = [
        *shlex.split(make_run),
        "-C",
        str(ROOT),
        f"VENV={VENV}",
        f"STATE={work / 'var'}",
        "-o",
        f"{VENV}/.runtime",  # the venv is made already: `make` must not reinstall it (no index needed)
    ]
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        make = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(make, base, log_path, START_SECONDS)
        banner = log_path.read_text()
        assert f"generated a new key in {work / 'var' / 'moxy.key'}" in banner
        assert f"cache in {work / 'var' / 'cache'}" in banner
        yield work, env, base
    finally:
        _stop(make)
    assert make.returncode is not None


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to `make` and Moxy under it (one process group), then SIGKILL if they outstay the drain."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        except ProcessLookupError:
            process.wait(timeout=5)
    deadline = time.monotonic() + STOP_SECONDS  # Moxy's supervisor and workers leave after make has gone
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)


def test_the_quick_start_serves_a_signed_url(origin: Origin, served: tuple[Path, dict[str, str], str]) -> None:
    work, env, base = served
    origin.route("/pic.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=3600"}, body=PNG))
    upstream = origin.url("/pic.png")
    (work / "urls.txt").write_text(f"{upstream}\n{origin.url('/pic.png?size=2')}\n")
    key_file = work / "var" / "moxy.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    _, commands = quick_start()
    signed: list[str] = []
    for command in commands:
        exported = re.fullmatch(r"export (\w+)=(\S+)", command)
        if exported:
            env = {**env, exported[1]: exported[2]}
            continue
        command = command.replace(EXAMPLE + "pic.png", upstream).replace(EXAMPLE, origin.url("/"))
        if PLACEHOLDER in command:
            assert signed, f"README.md: {command!r} verifies a URL before any was signed"
            command = command.replace(PLACEHOLDER, signed[0])
        assert not re.search(r"<\w+>", command), f"README.md: a placeholder this test cannot fill in {command!r}"
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"README.md: {command!r} exited {done.returncode}: {done.stderr}"
        if re.search(r"\bmoxy sign\b", command):
            signed += done.stdout.split()
        if re.search(r"\bmoxy verify\b", command):
            assert done.stdout.strip() == upstream

    assert len(signed) >= 2, "README.md: the quick start signs at least one URL"
    for url in signed:
        assert url.startswith(base + "/"), url  # a URL of the Moxy `make run` started
    first = httpx.get(signed[0], timeout=30)
    assert first.status_code == 200 and first.content == PNG
    # A quick start that warms (`moxy warm urls.txt`) has fetched the picture already.
    warmed = any(re.search(r"\bmoxy warm\b", command) for command in commands)
    assert first.headers["x-moxy-cache"] == ("HIT" if warmed else "MISS")
    assert httpx.get(signed[0], timeout=30).headers["x-moxy-cache"] == "HIT"
    assert all(httpx.get(url, timeout=30).status_code == 200 for url in signed)
    assert origin.hits("/pic.png") >= 1


def test_make_clean_keeps_the_key(tmp_path: Path) -> None:
    # In a folder of its own: `make clean` also removes caches and build leftovers from the folder it runs in.
    work = tmp_path / "checkout"
    (work / "var" / "cache" / "meta").mkdir(parents=True)
    (work / "var" / "moxy.key").write_text("a key every published URL depends on\n")
    (work / ".venv" / "bin").mkdir(parents=True)
    done = subprocess.run(
        ["make", "-f", str(ROOT / "Makefile"), "clean"], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (work / "var").iterdir()) == ["moxy.key"]
    assert not (work / ".venv").exists()
    assert "kept var/moxy.key" in done.stdout
