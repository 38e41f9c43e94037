"""The container image without a container engine: the Dockerfile's facts are read and checked, and its build and
run steps are replayed in a fresh venv (`make image-check` runs this file alone): the lock installs by hash, the
wheel built from the files .dockerignore lets through installs with no index, and the installed `moxy` serves
with the image's environment, passes `moxy health`, signs through the entrypoint and stops cleanly on STOPSIGNAL."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moxy import __version__
from moxy.config import Settings
from moxy.supervisor import GRACE_SECONDS, KILL_MARGIN_SECONDS
from tests.assets import KEY
from tests.net import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "deploy" / "requirements.txt"
# How long `moxy serve` may take to stop on SIGTERM: its workers' drain, then the supervisor's margin before it
# kills a worker still busy (moxy/supervisor.py). A stop grace must be longer.
DRAIN_SECONDS = GRACE_SECONDS + KILL_MARGIN_SECONDS


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # index of the FROM it follows


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments and the parser directive dropped."""
    found: list[Instruction] = []
    pending = ""
    stage = -1
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        found.append(Instruction(keyword.upper(), arguments.strip(), stage))
    return found


def one(keyword: str) -> Instruction:
    matching = [i for i in instructions() if i.keyword == keyword]
    assert len(matching) == 1, (keyword, matching)
    return matching[0]


def final_stage() -> list[Instruction]:
    every = instructions()
    last = max(i.stage for i in every)
    return [i for i in every if i.stage == last]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_base_is_a_pinned_python_release() -> None:
    base = next(i for i in instructions() if i.keyword == "ARG" and i.arguments.startswith("BASE=") and i.stage == -1)
    image = base.arguments.removeprefix("BASE=")
    # A patch release on a named Debian release (a digest may follow); never a floating tag.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", image), image
    froms = [i.arguments for i in instructions() if i.keyword == "FROM"]
    assert all(f.split()[0] == "${BASE}" for f in froms), froms


def test_entrypoint_command_health_and_stop() -> None:
    assert json.loads(one("ENTRYPOINT").arguments) == ["moxy"]
    assert json.loads(one("CMD").arguments) == ["serve"]
    health = one("HEALTHCHECK").arguments
    assert json.loads(health[health.index("CMD ") + 4 :]) == ["moxy", "health"]
    assert one("STOPSIGNAL").arguments == "SIGTERM"
    # The documented grace covers the drain, with room for the workers to exit.
    graces = {
        int(n)
        for n in re.findall(
            r"(?:--stop-timeout |stop_grace_period: |terminationGracePeriodSeconds: )(\d+)", DOCKERFILE.read_text()
        )
    }
    assert graces and all(grace > DRAIN_SECONDS for grace in graces), graces


def test_runs_unprivileged_with_the_key_from_a_secret() -> None:
    user = [i.arguments for i in final_stage() if i.keyword == "USER"]
    assert user and user[-1] not in ("root", "0")
    env = image_env()
    assert env["MOXY_KEY_FILE"].startswith("/run/secrets/")
    assert "MOXY_KEY" not in env and "MOXY_CAMO_KEY" not in env
    settings = set(Settings.model_fields)
    for name in env:
        if name.startswith("MOXY_"):
            assert name.removeprefix("MOXY_").lower() in settings, name
    assert env["MOXY_CACHE_DIR"] in one("VOLUME").arguments
    assert one("EXPOSE").arguments == env["MOXY_PORT"]


def test_oci_labels() -> None:
    labels = dict(
        pair.split("=", 1) for i in final_stage() if i.keyword == "LABEL" for pair in shlex.split(i.arguments)
    )
    for name in ("title", "description", "licenses", "version", "revision", "created"):
        assert f"org.opencontainers.image.{name}" in labels, name
    version_arg = next(i.arguments for i in final_stage() if i.keyword == "ARG" and i.arguments.startswith("VERSION"))
    assert version_arg == f"VERSION={__version__}"


def test_dependencies_layer_depends_on_the_lock_alone_and_no_wheel_stays() -> None:
    every = instructions()
    lock_copy = next(i for i in every if i.keyword == "COPY" and "deploy/requirements.txt" in i.arguments)
    stage = [i for i in every if i.stage == lock_copy.stage]
    # The lock's stage copies nothing else from the build context, so only a lock change rebuilds it.
    assert [i.arguments for i in stage if i.keyword == "COPY"] == [lock_copy.arguments]
    assert any("--require-hashes" in i.arguments for i in stage if i.keyword == "RUN")
    final = final_stage()
    copies = [i.arguments for i in final if i.keyword == "COPY"]
    assert copies == ["--from=deps /opt/moxy /opt/moxy"], copies
    installs = [i.arguments for i in final if i.keyword == "RUN" and ".whl" in i.arguments]
    assert len(installs) == 1 and installs[0].startswith("--mount=type=bind,from=build"), installs
    # The dependency layer comes before the layer that changes with every code change.
    assert final.index(next(i for i in final if i.arguments in copies)) < final.index(
        next(i for i in final if i.arguments == installs[0])
    )


def context_files() -> list[Path]:
    """The files .dockerignore lets into the build context (its rules: the last matching line wins)."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [rule for rule in rules if rule and not rule.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything is left out unless named"
    kept = []
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    candidates = set(tracked.split()) | {str(p.relative_to(ROOT)) for p in ROOT.glob("var/**/*") if p.is_file()}
    candidates |= {".venv/bin/python"}
    for name in sorted(candidates):
        included = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            parts = name.split("/")
            prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
            if pattern.startswith("**/"):
                hit = hit or any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
            if hit:
                included = negate
        if included:
            kept.append(Path(name))
    return kept


def test_build_context_is_only_what_the_image_needs() -> None:
    kept = context_files()
    tops = {path.parts[0] for path in kept}
    assert tops == {"pyproject.toml", "README.md", "LICENSE", "moxy", "deploy"}, tops
    assert [p for p in kept if p.parts[0] == "deploy"] == [Path("deploy/requirements.txt")]
    assert not [p for p in kept if p.suffix in (".key", ".pyc")]
    copied = {
        source
        for i in instructions()
        if i.keyword == "COPY" and not i.arguments.startswith("--from")
        for source in i.arguments.split()[:-1]
    }
    for source in copied:
        assert any(str(p) == source or str(p).startswith(source.rstrip("/") + "/") for p in kept), source


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's install steps, replayed: locked dependencies by hash, then the wheel of the build context."""
    root = tmp_path_factory.mktemp("image")
    venv = root / "opt-moxy"
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def run(*command: str | Path) -> None:
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=pip_env, timeout=540)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    run(pip, "install", "--require-hashes", "--no-deps", "--only-binary=:all:", "-r", LOCK)
    run(pip, "check")
    context = root / "context"
    for path in context_files():
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, context / path)
    run(venv / "bin" / "python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", root / "dist", context)
    wheels = list((root / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    run(pip, "install", "--no-deps", "--no-index", wheels[0])
    run(pip, "check")  # moxy's own requirements are all met by the lock
    return venv


def test_lock_covers_every_runtime_dependency(image_venv: Path) -> None:
    listed = subprocess.run(
        [image_venv / "bin" / "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    ).stdout
    installed = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed)} - {"pip", "setuptools"}
    locked = {line.split("==")[0].lower() for line in LOCK.read_text().splitlines() if "==" in line}
    assert installed == locked | {"moxy-proxy"}


def test_the_installed_image_serves_checks_health_signs_and_stops(image_venv: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secrets" / "moxy_key"
    secret.parent.mkdir()
    secret.write_text(KEY + "\n")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MOXY_", "PYTHON"))}
    env.update(image_env())
    env["PATH"] = f"{image_venv / 'bin'}:{env['PATH'].replace('$PATH', os.environ['PATH'])}"
    # The image's values, except those only a container can have: loopback for the listener (tests never listen
    # elsewhere), a free port, and folders of this test for the secret mount and the cache volume.
    env.update(
        {
            "MOXY_HOST": "127.0.0.1",
            "MOXY_PORT": str(port),
            "MOXY_KEY_FILE": str(secret),
            "MOXY_CACHE_DIR": str(tmp_path / "cache"),
        }
    )
    entrypoint = json.loads(one("ENTRYPOINT").arguments)
    command = json.loads(one("CMD").arguments)
    health = one("HEALTHCHECK").arguments
    health_command = json.loads(health[health.index("CMD ") + 4 :])
    assert shutil.which(entrypoint[0], path=env["PATH"]) == str(image_venv / "bin" / "moxy")

    signed = subprocess.run(
        [*entrypoint, "sign", "https://example.com/a.png"], env=env, capture_output=True, text=True, timeout=30
    )
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith(f"http://127.0.0.1:{port}/")

    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([*entrypoint, *command], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            checked = subprocess.run(health_command, env=env, capture_output=True, timeout=30)
            if checked.returncode == 0:
                break
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, checked.stderr
            time.sleep(0.2)
        server.send_signal(getattr(signal, one("STOPSIGNAL").arguments))
        assert server.wait(timeout=DRAIN_SECONDS + 5) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
        log.close()
    assert subprocess.run(health_command, env=env, capture_output=True, timeout=30).returncode == 1
