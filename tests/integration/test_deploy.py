"""deploy/: the compose file, the Kubernetes manifests and the systemd unit are parsed and cross-checked against
Moxy's settings and each other, and the compose topology runs for real on loopback: its nginx edge (its own
configuration file), two `moxy serve` with its environment, and redis-server with its command, in front of a local
origin. A request goes edge -> Moxy -> Redis -> origin, and the second Moxy then answers from Redis."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.report import RSS_ALLOWANCE_BYTES
from moxy.config import Settings
from moxy.supervisor import GRACE_SECONDS, KILL_MARGIN_SECONDS
from tests.assets import PNG
from tests.integration.cdn import require_nginx
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.integration.servers import require_binary
from tests.net import free_port

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# How long `moxy serve` may take to stop on SIGTERM: its workers' drain, then the supervisor's margin before it
# kills a worker still busy (moxy/supervisor.py). A stop grace must be longer.
DRAIN_SECONDS = GRACE_SECONDS + KILL_MARGIN_SECONDS
SETTINGS = set(Settings.model_fields)
MIB = 1024 * 1024


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def kubernetes() -> dict[str, dict[str, Any]]:
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "moxy.yaml").read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents), "one object of each kind"
    return by_kind


def check_setting_names(names: list[str] | set[str], where: str) -> None:
    for name in names:
        assert name.startswith("MOXY_"), f"{where}: {name}"
        assert name.removeprefix("MOXY_").lower() in SETTINGS, f"{where}: {name} is no setting of moxy/config.py"


def quantity_bytes(text: str) -> int:
    """A memory quantity as compose ("768M") or Kubernetes ("768Mi") write it, in bytes (binary units both)."""
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)?[bB]?", str(text)).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[unit[0] if unit else None]


def budget(environment: dict[str, str]) -> int:
    """What the workers may hold: each its memory cache plus the allowance bench/report.py holds them to."""
    workers = int(environment.get("MOXY_WORKERS", "1"))
    memory = int(environment.get("MOXY_MEMORY_CACHE_BYTES", str(256 * MIB)))
    return workers * (memory + RSS_ALLOWANCE_BYTES)


def seconds(text: str | int) -> int:
    match = re.fullmatch(r"(\d+)(s?)", str(text))
    assert match, text
    return int(match.group(1))


# -- docker-compose.yml ------------------------------------------------------------------------------------------


def moxy_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in spec["services"].items() if name.startswith("moxy")}


def nginx_upstreams() -> list[tuple[str, int]]:
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    return [(host, int(port)) for host, port in re.findall(r"^\s*server ([\w.-]+):(\d+)\b", text, re.MULTILINE)]


def test_compose_file_hangs_together() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"moxy-a", "moxy-b", "redis", "edge"}
    moxies = moxy_services(spec)
    upstreams = nginx_upstreams()
    assert sorted(host for host, _ in upstreams) == sorted(moxies)
    for name, service in moxies.items():
        environment = service["environment"]
        check_setting_names(set(environment), name)
        assert service["command"] == ["serve"]
        # The edge reaches each Moxy where it listens; its Redis URL names the Redis service.
        assert dict(upstreams)[name] == int(environment["MOXY_PORT"])
        assert environment["MOXY_REDIS_URL"].startswith("redis://redis:")
        # The key is a secret mounted where the image's MOXY_KEY_FILE points.
        assert environment["MOXY_KEY_FILE"] == f"/run/secrets/{service['secrets'][0]}"
        assert "MOXY_KEY" not in environment
        assert seconds(service["stop_grace_period"]) > DRAIN_SECONDS
        assert quantity_bytes(service["deploy"]["resources"]["limits"]["memory"]) >= budget(environment)
        assert any(volume.endswith(":/var/cache/moxy") for volume in service["volumes"])
        assert set(service["depends_on"]) == {"redis"}
    assert services["edge"]["depends_on"] == {name: {"condition": "service_healthy"} for name in moxies}
    assert services["edge"]["volumes"][0].startswith("./nginx/nginx.conf:/etc/nginx/nginx.conf")
    published = services["edge"]["ports"][0].split(":")
    for service in moxies.values():
        assert service["environment"]["MOXY_BASE_URL"] == f"http://127.0.0.1:{published[0]}"
    assert spec["secrets"]["moxy_key"]["file"] == "../var/moxy.key"  # var/ is ignored by git and by .dockerignore


# -- Kubernetes ----------------------------------------------------------------------------------------------------


def test_kubernetes_manifests_hang_together() -> None:
    objects = kubernetes()
    assert set(objects) == {"Secret", "Deployment", "Service"}
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    environment = {item["name"]: item["value"] for item in container["env"]}
    check_setting_names(set(environment), "Deployment")
    (port,) = container["ports"]
    assert port["containerPort"] == int(environment["MOXY_PORT"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    service = objects["Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]

    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    # The key: the Secret's one entry, mounted where MOXY_KEY_FILE points.
    secret = objects["Secret"]
    (key_name,) = secret["stringData"]
    assert volumes["key"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert environment["MOXY_KEY_FILE"] == f"{mounts['key']}/{key_name}"
    assert secret["stringData"][key_name] == "", "no key is ever shipped; an empty one stops Moxy at start"
    # The cache: a volume at MOXY_CACHE_DIR with room for the disk tier.
    assert mounts["cache"] == environment["MOXY_CACHE_DIR"]
    assert quantity_bytes(volumes["cache"]["emptyDir"]["sizeLimit"]) > int(environment["MOXY_DISK_CACHE_BYTES"])

    limits = container["resources"]["limits"]
    assert quantity_bytes(limits["memory"]) >= budget(environment)
    assert quantity_bytes(container["resources"]["requests"]["memory"]) <= quantity_bytes(limits["memory"])
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + DRAIN_SECONDS
    assert container["args"] == ["serve"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


# -- systemd -------------------------------------------------------------------------------------------------------


def unit() -> dict[str, list[str]]:
    """The unit's directives, each with every value it is given (Environment= and others repeat)."""
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "moxy.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            found.setdefault(name, []).append(value)
    return found


def test_systemd_unit_is_sandboxed_and_hangs_together() -> None:
    directives = unit()
    for name, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "StateDirectory": "moxy",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",  # the signal to the supervisor alone, which drains its workers
        "ExecReload": "/bin/kill -HUP $MAINPID",  # a rolling restart
        "CapabilityBoundingSet": "",
    }.items():
        assert directives[name] == [value], name
    environment = dict(pair.split("=", 1) for pair in directives["Environment"])
    check_setting_names(set(environment), "moxy.service")
    assert environment["MOXY_CACHE_DIR"] == "%S/" + directives["StateDirectory"][0]
    credential, _, _ = directives["LoadCredential"][0].partition(":")
    assert environment["MOXY_KEY_FILE"] == f"%d/{credential}"
    assert directives["ExecStart"][0].split()[-2:] == ["moxy", "serve"] or directives["ExecStart"][0].endswith(
        "/moxy serve"
    )
    assert seconds(directives["TimeoutStopSec"][0]) > DRAIN_SECONDS
    assert quantity_bytes(directives["MemoryMax"][0]) >= budget(environment)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "/usr/bin/systemd-analyze")
    moxy = str(Path(sys.executable).parent / "moxy")  # the console script beside this interpreter
    text = (DEPLOY / "systemd" / "moxy.service").read_text()
    # The unit names where the install steps put Moxy; here the command is this venv's.
    (tmp_path / "moxy.service").write_text(text.replace("/opt/moxy/bin/moxy", moxy))
    checked = subprocess.run([analyze, "verify", str(tmp_path / "moxy.service")], capture_output=True, text=True)
    # verify exits 0 over directives it ignores, but names them: nothing may be said.
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr


# -- the compose topology, run for real ----------------------------------------------------------------------------


def start_redis(command: list[str], folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = require_binary("redis-server", "/usr/bin/redis-server")
    port = free_port()
    process = subprocess.Popen(
        [binary, *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return process, port
        assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)


def edge_config(upstreams: dict[str, int], port: int, folder: Path) -> str:
    """deploy/nginx/nginx.conf with the compose network's names and the image's paths made local to this test."""
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()

    def replace(old: str, new: str, count: int = 1) -> None:
        nonlocal text
        assert text.count(old) == count, f"deploy/nginx/nginx.conf no longer has {old!r} {count}x"
        text = text.replace(old, new)

    for name, moxy_port in upstreams.items():
        replace(f"server {name}:8080 ", f"server 127.0.0.1:{moxy_port} ")
    replace("listen 80;", f"listen 127.0.0.1:{port};")
    replace("/var/log/nginx", str(folder), count=2)
    replace("/var/cache/nginx", str(folder / "cache"))
    replace("/var/run/nginx.pid", str(folder / "nginx.pid"))
    temp = "".join(f"    {kind}_temp_path {folder}/tmp/{kind};\n" for kind in ("client_body", "proxy", "fastcgi"))
    temp += "".join(f"    {kind}_temp_path {folder}/tmp/{kind};\n" for kind in ("uwsgi", "scgi"))
    replace("http {\n", "http {\n" + temp)
    if os.geteuid() == 0:  # nginx started as root hands its workers to `nobody`, who cannot enter a pytest folder
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
        text = user + text
    return text


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], str]]:
    binary = require_nginx()
    started: list[subprocess.Popen[bytes]] = []

    def start(upstreams: dict[str, int]) -> str:
        folder = tmp_path / "edge"
        (folder / "tmp").mkdir(parents=True)
        (folder / "cache").mkdir()  # /var/cache/nginx, which the nginx image has
        for _ in range(5):  # free_port may lose a race for the port: nginx then exits, and another port is tried
            port = free_port()
            (folder / "nginx.conf").write_text(edge_config(upstreams, port, folder))
            (folder / "nginx.pid").unlink(missing_ok=True)
            command = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
            with open(folder / "stderr.log", "ab") as stderr:
                process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr)
            started.append(process)
            deadline = time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                if (folder / "nginx.pid").exists():
                    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        return f"http://127.0.0.1:{port}"
                time.sleep(0.02)
        raise AssertionError(f"nginx did not start: {(folder / 'stderr.log').read_text(errors='replace')[-2000:]}")

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[int]:
    command = compose()["services"]["redis"]["command"]
    folder = tmp_path / "redis"
    folder.mkdir()
    process, port = start_redis(command, folder)
    yield port
    process.terminate()
    process.wait(timeout=10)


def test_a_request_goes_edge_moxy_redis_origin(
    origin: Origin, start_moxy: StartMoxy, redis: int, edge: Callable[[dict[str, int]], str], tmp_path: Path
) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    spec = compose()
    moxies: dict[str, MoxyServer] = {}
    for name, service in moxy_services(spec).items():
        environment = dict(service["environment"])
        # The compose settings, except what only the compose network has: addresses, the secret's path, volumes.
        for local in ("MOXY_PORT", "MOXY_BASE_URL", "MOXY_KEY_FILE"):
            environment.pop(local)
        environment["MOXY_REDIS_URL"] = environment["MOXY_REDIS_URL"].replace("redis:6379", f"127.0.0.1:{redis}")
        settings = {key.removeprefix("MOXY_").lower(): value for key, value in environment.items()}
        workers = int(settings.pop("workers"))
        moxies[name] = start_moxy(cache_dir=tmp_path / name, workers=workers, access_log=1, **settings)
    base = edge({name: moxy.port for name, moxy in moxies.items()})

    first_moxy = next(iter(moxies.values()))
    signed = first_moxy.sign(origin.url("/a.png"))
    path = signed[len(first_moxy.base_url) :]
    with httpx.Client(timeout=30) as client:
        first = client.get(base + path)
        assert first.status_code == 200 and first.content == PNG
        assert first.headers["x-edge-cache"] == "MISS" and first.headers["x-moxy-cache"] == "MISS"
        again = client.get(base + path)
        assert again.headers["x-edge-cache"] == "HIT" and again.content == PNG
        assert origin.hits("/a.png") == 1
        # Whichever Moxy the edge asked, the other one has the copy too: from Redis, not from the origin.
        for moxy in moxies.values():
            direct = client.get(moxy.base_url + path)
            assert direct.status_code == 200 and direct.content == PNG
            assert direct.headers["x-moxy-cache"] == "HIT", dict(direct.headers)
        assert origin.hits("/a.png") == 1
        # The edge keeps /metrics and /purge to the inside network.
        assert client.get(base + "/metrics").status_code == 403
        assert client.post(base + "/purge", json={"url": origin.url("/a.png")}).status_code == 403
