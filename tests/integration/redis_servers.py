"""redis-server processes for the integration tests (on 127.0.0.1, in a temporary folder), and a TCP relay that
makes a Redis slow, or unreachable, on demand.

    with RedisServer(folder) as redis:          # redis.url; redis.kill(); redis.start() again on the same port
        ...
    with RedisClusterNodes(folder) as cluster:  # three masters sharing the slots; cluster.url names one of them
        ...
    with LatencyRelay(redis.port) as relay:     # relay.url reaches the same Redis; relay.delay = 2.0 makes it
        ...                                     # slow, relay.cut() cuts it off until relay.restore()

A missing redis-server fails the test under CI=true and skips it elsewhere (tests/integration/servers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.servers import require_binary
from tests.net import free_port

__all__ = ["LatencyRelay", "RedisClusterNodes", "RedisServer"]


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start")
            time.sleep(0.02)


class RedisServer:
    def __init__(self, folder: Path, *extra: str) -> None:
        self.binary = require_binary("redis-server", "/usr/bin/redis-server")
        self.folder = folder
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.folder), *self.extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.port, self.process, "redis-server")
        return self

    def kill(self) -> None:
        """SIGKILL: connections drop at once, nothing is saved (as a crashed or rebooted Redis)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LatencyRelay:
    """Relays TCP connections from its own port to `target_port`, holding every chunk Redis sends back for `delay`
    seconds (set it at any time: it applies to chunks relayed from then on). It runs in a process of its own (this
    module run as a script), so the test's client threads cannot slow the relay down, and is steered over a small
    control port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.control_port = free_port()
        self._delay = 0.0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._command(f"delay {seconds}")
        self._delay = seconds

    def cut(self) -> None:
        """Drop every relayed connection and every new one until restore(): a host cut off from Redis."""
        self._command("cut")

    def restore(self) -> None:
        self._command("restore")

    def start(self) -> LatencyRelay:
        ports = [str(self.port), str(self.target_port), str(self.control_port)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.redis_servers", *ports], cwd=Path(__file__).parents[2]
        )
        _wait_listening(self.control_port, self.process, "the latency relay")
        _wait_listening(self.port, self.process, "the latency relay")
        return self

    def _command(self, line: str) -> None:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as control:
            control.sendall(line.encode() + b"\n")
            assert control.recv(16) == b"ok\n"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> LatencyRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _relay(listen_port: int, target_port: int, control_port: int) -> None:
    """The relay process: see LatencyRelay."""
    state = {"delay": 0.0, "severed": False}
    writers: set[asyncio.StreamWriter] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if slow and state["delay"]:
                    await asyncio.sleep(state["delay"])
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if state["severed"]:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.transport.abort()
            return
        writers.update((client_writer, server_writer))
        await asyncio.gather(pipe(client_reader, server_writer, False), pipe(server_reader, client_writer, True))
        writers.difference_update((client_writer, server_writer))

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command, _, value = (await reader.readline()).decode().strip().partition(" ")
        if command == "delay":
            state["delay"] = float(value)
        elif command == "cut":
            state["severed"] = True
            for relayed in list(writers):
                relayed.transport.abort()
        elif command == "restore":
            state["severed"] = False
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()

    relays = await asyncio.start_server(relay, "127.0.0.1", listen_port)
    controls = await asyncio.start_server(control, "127.0.0.1", control_port)
    async with relays, controls:
        await asyncio.Event().wait()  # until terminated


def _cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is a valid port and free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no port pair for a cluster node")


class RedisClusterNodes:
    """Three redis-server nodes in cluster mode, the 16384 slots shared out among them by `redis-cli --cluster
    create` (no replicas: the tests need the cluster's routing, not its failover). `url` names one node, as a
    client's setting would; the client finds the others."""

    def __init__(self, folder: Path) -> None:
        self.cli = require_binary("redis-cli", "/usr/bin/redis-cli")
        self.nodes = [
            RedisServer(folder / f"node-{n}", "--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
            for n in range(3)
        ]
        for node in self.nodes:
            node.port = _cluster_port()

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while True:
            states = [
                subprocess.run(
                    [self.cli, "-p", str(node.port), "cluster", "info"], capture_output=True, text=True, timeout=5
                ).stdout
                for node in self.nodes
            ]
            if all("cluster_state:ok" in state for state in states):
                return self
            if time.monotonic() > deadline:
                pytest.fail("the Redis cluster did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    asyncio.run(_relay(*(int(port) for port in sys.argv[1:4])))
