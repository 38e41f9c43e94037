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
import threading
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
    seconds (set it at any time: it applies to chunks relayed from then on). Runs its own loop in a thread."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay = 0.0
        self.severed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LatencyRelay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def cut(self) -> None:
        """Drop every relayed connection and every new one until restore(): a host cut off from Redis."""

        def sever() -> None:
            self.severed = True
            for writer in self._writers:
                writer.transport.abort()

        self._loop.call_soon_threadsafe(sever)

    def restore(self) -> None:
        self.severed = False

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.severed:
            writer.transport.abort()
            return
        task = self._loop.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._writers.add(server_writer)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if slow and self.delay:
                        await asyncio.sleep(self.delay)
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_reader, server_writer, False), pipe(server_reader, client_writer, True))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in self._writers:
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> LatencyRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
