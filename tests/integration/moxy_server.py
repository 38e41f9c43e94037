"""Moxy (`moxy serve`, real uvicorn) in a child process, on an ephemeral port bound by the test (no port race)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from moxy.signing import Signer
from tests import processes
from tests.assets import KEY

# What a fault of Moxy's own code leaves in its log (moxy.app's record, uvicorn's report of an escaped exception).
INTERNAL_ERROR_SIGNS = (
    '"event":"internal-error"',
    "Exception in ASGI application",
    "Traceback (most recent call last)",
)


class MoxyServer:
    def __init__(self, cache_dir: Path, *, workers: int = 1, app: str = "moxy.app:create_app", **settings: Any) -> None:
        self.cache_dir = cache_dir
        self.workers = workers
        self.app = app  # an app factory path: tests may wrap the real one with a seam (see tests/integration/seams.py)
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = cache_dir.parent / f"moxy-{id(self)}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MoxyServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # uvicorn takes an inherited fd for a Unix socket and so never sets TCP_NODELAY on what it accepts; on
        # Linux accepted sockets inherit it from the listener, which spares every answer a delayed-ACK wait.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        listener.set_inheritable(True)
        self.port = listener.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOXY_")}
        env.update(
            {
                "MOXY_KEY": KEY,
                "MOXY_BASE_URL": self.base_url,
                "MOXY_CACHE_DIR": str(self.cache_dir),
                "MOXY_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
            }
        )
        for name, value in self.settings.items():
            if value is None:
                env.pop(f"MOXY_{name.upper()}", None)  # e.g. key=None: no MOXY_KEY, so MOXY_KEY_FILE is read
            else:
                env[f"MOXY_{name.upper()}"] = str(value)
        # The product command itself, so every integration test runs what `moxy serve` builds (its client bounds
        # included), on the socket bound above.
        command = [sys.executable, "-m", "moxy", "serve", "--fd", str(listener.fileno())]
        command += ["--workers", str(self.workers)]
        if self.app != "moxy.app:create_app":
            command += ["--app", self.app]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, pass_fds=[listener.fileno()], stderr=log, stdout=log)
        listener.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moxy exited {self.process.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"moxy did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sign(self, url: str, expires_in: float | None = None) -> str:
        return Signer([KEY], self.base_url).sign(url, expires_in=expires_in)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.sign(url), timeout=kwargs.pop("timeout", 30), **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.assert_no_internal_errors()

    def internal_errors(self) -> list[str]:
        """Log lines that show a fault of Moxy's own code: its internal-error record, or an exception that
        reached the server (a 500 or a broken answer)."""
        return [line for line in self.log().splitlines() if any(sign in line for sign in INTERNAL_ERROR_SIGNS)]

    def assert_no_internal_errors(self) -> None:
        # Every integration test doubles as a check that Moxy itself caused no 5xx: whatever the test provoked,
        # a bug shows here even when the answer the test looked at was fine.
        found = self.internal_errors()
        assert not found, "Moxy's own code failed:\n" + "\n".join(line[:2000] for line in found[:5])

    def worker_pids(self) -> set[int]:
        """The processes that serve: `moxy serve` is a supervisor, its workers are its children (moxy.supervisor)."""
        assert self.process is not None
        return processes.children(self.process.pid)

    def worker_pid(self) -> int:
        """The one worker of a single-worker Moxy: where its memory, descriptors and connections are."""
        found = self.worker_pids()
        assert len(found) == 1, f"{len(found)} workers"
        return found.pop()

    def peak_rss_kib(self) -> int:
        """The largest peak RSS (VmHWM) among the workers."""
        peaks = []
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]))
        if not peaks:
            raise RuntimeError("no VmHWM")
        return max(peaks)

    def __enter__(self) -> MoxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
