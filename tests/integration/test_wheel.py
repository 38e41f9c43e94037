"""Moxy as a user installs it: the wheel built from this tree, installed into a fresh virtualenv, and its `moxy`
command run from folders that are not the checkout, with no MOXY_KEY, MOXY_KEY_FILE or MOXY_CACHE_DIR: `serve
--init-key` keeps a key in the user's config folder and a cache in the user's cache folder, `sign` from another
folder finds the key, and the signed URL is served from a real upstream on loopback.

No index is needed beyond what building needs: the wheel installs with --no-index, and its dependencies are those of
the venv running the tests, seen through a .pth file (as an installed package sees site-packages; the editable
install of the checkout there is not activated, so `moxy` is the wheel's). test_image.py replays the Dockerfile's
hash-locked install instead."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx
import pytest

from moxy import __version__
from tests.assets import PNG
from tests.integration.origin import Origin, Reply
from tests.integration.servers import wait_until_healthy
from tests.net import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_SECONDS = 30
STOP_SECONDS = 45  # SIGTERM drains for up to 30 s before Moxy exits (moxy/supervisor.py)


def _run(
    *command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _build_wheel(folder: Path) -> Path:
    """The wheel of the distribution files (copied out first, so no build leftovers land in the checkout)."""
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "moxy", source / "moxy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    command: list[str | Path] = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", folder / "dist"]
    # The license fields (PEP 639) need setuptools 77: build with the one installed here when it is that new (no
    # index), else in pip's isolated build environment, as the Dockerfile does.
    if _setuptools_major() >= 77:
        command.append("--no-build-isolation")
    _run(*command, source, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = (folder / "dist").glob("moxy_proxy-*.whl")
    return wheel


def _setuptools_major() -> int:
    try:
        return int(version("setuptools").split(".")[0])
    except PackageNotFoundError:  # a venv of Python 3.12 has none unless something installed it
        return 0


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel: its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(root)
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    # Then the dependencies: the test venv's site-packages, after the fresh venv's own (a .pth adds a path; only
    # .pth files in a site folder itself run, so the checkout's editable-install hook there stays off).
    fresh_site = _run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(fresh_site.stdout.strip()) / "test-venv-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv / "bin"


def _environment(bin_folder: Path, home: Path, port: int) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MOXY_", "PYTHON", "XDG_", "VIRTUAL_ENV"))
    }
    return env | {
        "PATH": f"{bin_folder}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(home),
        "MOXY_PORT": str(port),
        "MOXY_ALLOWED_NETWORKS": "127.0.0.0/8",  # the upstream of this test is on loopback
    }


def test_the_wheel_serves_a_signed_url_from_any_folder(installed: Path, origin: Origin, tmp_path: Path) -> None:
    origin.route("/pic.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=3600"}, body=PNG))
    home = tmp_path / "home"
    home.mkdir()
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    port = free_port()
    env = _environment(installed, home, port)

    found = _run("python", "-c", "import moxy; print(moxy.__file__, moxy.__version__)", cwd=here, env=env)
    location, _, shown_version = found.stdout.strip().partition(" ")
    assert Path(location).is_relative_to(installed.parent) and shown_version == __version__, found.stdout
    assert _run("moxy", "-V", cwd=here, env=env).stdout.strip() == f"moxy, version {__version__}"

    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(["moxy", "serve", "--init-key"], cwd=here, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(server, base, log_path, START_SECONDS)
        key_file = home / ".config" / "moxy" / "moxy.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert f"cache in {home / '.cache' / 'moxy'}" in log_path.read_text()

        # Another folder, no setting but the port: the key is found where serve made it.
        signed = _run("moxy", "sign", origin.url("/pic.png"), cwd=there, env=env).stdout.strip()
        assert signed.startswith(base + "/")
        first = httpx.get(signed, timeout=30)
        assert first.status_code == 200 and first.content == PNG
        assert first.headers["x-moxy-cache"] == "MISS"
        assert httpx.get(signed, timeout=30).headers["x-moxy-cache"] == "HIT"
        assert (home / ".cache" / "moxy").is_dir()
        assert not list(here.iterdir()) and not list(there.iterdir())  # nothing written where it was started

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=STOP_SECONDS) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
