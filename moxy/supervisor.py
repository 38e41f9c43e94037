"""`moxy serve`'s processes: a supervisor holding the listening socket, and worker processes serving on it.

SIGHUP replaces the workers one at a time (each replacement serves before its predecessor stops accepting), SIGTERM
drains them all, and a worker never outlives its supervisor. Workers are fresh interpreters (`python -m moxy worker`),
so a replacement runs the code and reads the settings installed at the time of the SIGHUP. Imports no click: moxy.cli
builds the worker command and each worker's uvicorn configuration."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from moxy.errors import ConfigError
from moxy.server import DrainState

__all__ = [
    "GRACE_SECONDS",
    "Supervisor",
    "WorkerServer",
    "bind_to_supervisor",
    "listen",
    "listen_admin",
    "run_worker",
    "supervise",
]

# How long a stopping worker may take over the requests it holds (uvicorn's timeout_graceful_shutdown); past it the
# worker cancels them. The supervisor waits this long and a little more before it kills a worker that hangs.
GRACE_SECONDS = 30.0
KILL_MARGIN_SECONDS = 5.0
# From start to serving: imports, settings, the app's lifespan (the disk tier's first scan of a large cache).
READY_TIMEOUT_SECONDS = 60.0
# A worker that dies on its own is replaced, but not more often than this, so a worker that cannot start (the
# installed code broke under it) does not spin the machine.
RESPAWN_PAUSE_SECONDS = 1.0
READY = b"R"  # what a worker writes on its control socket once it serves
DRAINING = b"D"  # and once it has stopped accepting
# How long a reload waits for a replaced worker to stop accepting (uvicorn looks at its stop flag every 0.1 s).
STOP_ACCEPTING_SECONDS = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _say(message: str) -> None:
    sys.stderr.write(f"moxy: {message}\n")
    sys.stderr.flush()


def _exit_status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


# -- the worker side ------------------------------------------------------------------------------------------------


def bind_to_supervisor(supervisor_pid: int) -> str:
    """Make this worker die with its supervisor; return how ("pdeathsig" or "control socket").

    On Linux the kernel sends SIGKILL the moment the supervisor dies, whatever killed it (SIGKILL, the OOM killer).
    The request is made after the fork, so a supervisor gone before it is caught by comparing the parent. Elsewhere
    (or if prctl is refused) the worker notices its control socket's end of file (`WorkerServer`), within a loop turn.
    """
    how = "control socket"
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "pdeathsig"
    if os.getppid() != supervisor_pid:
        os._exit(STARTUP_FAILURE)  # the supervisor died before the request took effect: nobody to serve for
    return how


class WorkerServer(uvicorn.Server):
    """uvicorn's Server in a supervised worker: it says when it serves, marks the drain for its connections
    (moxy.server.DrainState), serves what already waits in the listen queue before closing its copy of the listener,
    and stops at once if its supervisor is gone. With an `admin` listener (MOXY_ADMIN_PORT) it serves that too, its
    connections marked as the admin listener's (moxy.server.BoundedHttpToolsProtocol's `admin`)."""

    def __init__(self, config: uvicorn.Config, control: socket.socket, admin: socket.socket | None = None) -> None:
        super().__init__(config)
        self.server_state = DrainState()
        self.control = control
        self.admin = admin

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        loop = asyncio.get_running_loop()
        if self.admin is not None:
            # Served before the worker says it is ready, so a reload never leaves the admin port without a worker.
            admin = await loop.create_server(
                lambda: self._protocol(admin=True), sock=self.admin, backlog=self.config.backlog
            )
            self.servers.append(admin)
        loop.add_reader(self.control.fileno(), self._control_readable)
        with contextlib.suppress(OSError):  # a supervisor gone already: the reader above ends this worker
            self.control.sendall(READY)

    def _control_readable(self) -> None:
        # The supervisor writes nothing to its workers: a readable control socket is its end closing, so it died
        # (its own stop drains the workers first). Nobody is left to restart or stop this worker: it leaves now.
        try:
            data = self.control.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            os._exit(1)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        assert isinstance(self.server_state, DrainState)
        self.server_state.draining = True
        loop = asyncio.get_running_loop()
        # Connections the kernel completed but nobody accepted yet die with the listening socket's last descriptor
        # (a reset to a client that did nothing wrong). Those waiting now are taken and served, and the listener
        # closed in the same step, with no await between: only a connection that arrives after that is refused.
        waiting: list[tuple[socket.socket, bool]] = []
        listeners = [(listener, False) for listener in sockets or []]
        if self.admin is not None:
            listeners.append((self.admin, True))
        for listener, admin in listeners:
            with contextlib.suppress(OSError):
                while True:
                    waiting.append((listener.accept()[0], admin))
        for server in self.servers:
            server.close()
        with contextlib.suppress(OSError):
            self.control.sendall(DRAINING)
        for connection, admin in waiting:
            await loop.connect_accepted_socket(functools.partial(self._protocol, admin=admin), connection)
        await super().shutdown(sockets)

    def _protocol(self, admin: bool = False) -> asyncio.Protocol:
        # What uvicorn's startup gives its servers as the protocol factory, for a connection accepted by hand, and
        # for the admin listener's (moxy.server.BoundedHttpToolsProtocol takes `admin`).
        extra = {"admin": True} if admin else {}
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
            _loop=asyncio.get_running_loop(),
            **extra,
        )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_worker(config: uvicorn.Config, listen_fd: int, control_fd: int, admin_fd: int | None = None) -> None:
    """Serve on the inherited listening socket (and the admin one, `admin_fd`) until told to stop (SIGTERM or
    SIGINT: drain, then exit 0)."""
    # A terminal's hangup reaches the whole process group; reloading is the supervisor's to do, not the workers'.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again with the handler in place before it started;
    # with these the worker then exits 0, a clean stop, instead of dying of the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    control = socket.socket(fileno=control_fd)
    listener = socket.socket(fileno=listen_fd)  # family and type read from the descriptor (TCP or Unix)
    admin = socket.socket(fileno=admin_fd) if admin_fd is not None else None
    WorkerServer(config, control, admin).run(sockets=[listener])


# -- the supervisor side --------------------------------------------------------------------------------------------


def listen(host: str, port: int, fd: int | None) -> socket.socket:
    """The listening socket the workers share: the inherited descriptor `fd`, or host:port bound here."""
    if fd is not None:
        return socket.socket(fileno=fd)
    return _bind(host, port, "MOXY_HOST", "MOXY_PORT")


def listen_admin(host: str, port: int) -> socket.socket:
    """The admin listener (MOXY_ADMIN_HOST:MOXY_ADMIN_PORT) the workers share, beside the main one."""
    return _bind(host, port, "MOXY_ADMIN_HOST", "MOXY_ADMIN_PORT")


def _bind(host: str, port: int, host_setting: str, port_setting: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        setting = port_setting if exc.errno == errno.EADDRINUSE else host_setting  # else an address not on this host
        reason = exc.strerror or str(exc)  # a name that does not resolve has a negative errno: its own text
        raise ConfigError(setting, f"cannot listen on {host}:{port}: {reason}") from exc


@dataclass(eq=False, slots=True)
class _Worker:
    process: subprocess.Popen[bytes]
    control: socket.socket
    ready: bool = False
    draining: bool = False  # it has stopped accepting
    deadline: float | None = None  # once told to stop: when it is killed if still alive

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return self.process.poll() is not None


class _Stop(Exception):
    """A stop signal arrived while the supervisor waited for something else."""


class Supervisor:
    """N workers on one listening socket; SIGHUP rolls them over one at a time, SIGTERM/SIGINT drain and stop.

    `command` starts one worker: the supervisor appends `--listen-fd`, `--control-fd` and `--supervisor` (and
    `--admin-fd` with an `admin` listener, which every worker serves beside the main one: any worker can answer for
    all, as /metrics sums every worker's files and a purge reaches every worker through the purge log, and a reload
    or a dead worker then never leaves the admin port unserved). `preflight` re-reads and checks the settings before
    a reload (raising ConfigError): a configuration that fails it is refused with one line and the running workers
    keep serving."""

    def __init__(
        self,
        listener: socket.socket,
        workers: int,
        command: Sequence[str],
        preflight: Callable[[], object],
        *,
        admin: socket.socket | None = None,
        grace: float = GRACE_SECONDS,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
    ) -> None:
        self.listener = listener
        self.admin = admin
        self.count = workers
        self.command = list(command)
        self.preflight = preflight
        self.grace = grace
        self.ready_timeout = ready_timeout
        self.serving: list[_Worker] = []
        self.retiring: list[_Worker] = []
        self.stop_signal: int | None = None
        self.reload_requested = False
        self.next_respawn = 0.0
        self.selector = selectors.DefaultSelector()
        self.wake_read, self.wake_write = socket.socketpair()

    # -- signals and events

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_signal = signum

    def _install_signals(self) -> None:
        for sock in (self.wake_read, self.wake_write):
            sock.setblocking(False)
        self.selector.register(self.wake_read, selectors.EVENT_READ, None)
        # A signal's byte on this socket wakes the select below at once (Python runs the handler itself later).
        signal.set_wakeup_fd(self.wake_write.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _pump(self, timeout: float) -> None:
        """Wait up to `timeout` for a signal or a worker's word, and take it in."""
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(OSError):
                    self.wake_read.recv(4096)
                continue
            worker: _Worker = key.data
            try:
                data = worker.control.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                worker.ready = worker.ready or READY in data
                worker.draining = worker.draining or DRAINING in data
            else:  # its end closed: it exited (reaped by whoever waits for it)
                self.selector.unregister(worker.control)

    def _wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if self.stop_signal is not None:
                raise _Stop
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(min(left, 0.5))
            self._reap_retiring()
        return True

    # -- workers

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        command = [
            *self.command,
            *("--listen-fd", str(self.listener.fileno())),
            *("--control-fd", str(theirs.fileno())),
            *("--supervisor", str(os.getpid())),
        ]
        passed = [self.listener.fileno(), theirs.fileno()]
        if self.admin is not None:
            command += ["--admin-fd", str(self.admin.fileno())]
            passed.append(self.admin.fileno())
        try:
            # From this (the main) thread: Linux sends a worker's parent-death signal when the thread that forked it
            # ends, not only the process.
            process = subprocess.Popen(command, pass_fds=passed)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker's end lives in the worker only, so its exit reads here as end of file
        ours.setblocking(False)
        worker = _Worker(process, ours)
        self.selector.register(ours, selectors.EVENT_READ, worker)
        return worker

    def _forget(self, worker: _Worker) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(worker.control)
        worker.control.close()

    def _retire(self, worker: _Worker) -> None:
        """Tell a worker to stop: it stops accepting, finishes what it holds, and exits; it is killed if it hangs."""
        if not worker.exited():
            worker.process.send_signal(signal.SIGTERM)
        worker.deadline = time.monotonic() + self.grace + KILL_MARGIN_SECONDS
        self.retiring.append(worker)

    def _reap_retiring(self) -> None:
        for worker in list(self.retiring):
            if worker.exited():
                self.retiring.remove(worker)
                self._forget(worker)
            elif worker.deadline is not None and time.monotonic() > worker.deadline:
                _say(f"worker {worker.pid} still busy {self.grace:g} s after it was told to stop: killed")
                worker.process.kill()
                worker.process.wait()

    def _kill(self, worker: _Worker) -> None:
        if not worker.exited():
            worker.process.kill()
        worker.process.wait()
        self._forget(worker)

    def _replace_dead(self) -> None:
        for index, worker in enumerate(self.serving):
            if not worker.exited() or time.monotonic() < self.next_respawn:
                continue
            assert worker.process.returncode is not None
            _say(f"worker {worker.pid} ended on its own ({_exit_status(worker.process.returncode)}): starting another")
            self._forget(worker)
            self.next_respawn = time.monotonic() + RESPAWN_PAUSE_SECONDS
            self.serving[index] = self._spawn()

    def _start_one(self) -> tuple[_Worker, str | None]:
        """A new worker, serving; or, when it could not start, the reason (it is gone by then)."""
        worker = self._spawn()
        try:
            started = self._wait_until(lambda: worker.ready or worker.exited(), self.ready_timeout)
        except _Stop:
            self._retire(worker)  # stopped halfway: it drains with the others
            raise
        if started and worker.ready:
            return worker, None
        code = worker.process.poll()
        self._kill(worker)
        how = _exit_status(code) if code is not None else f"not serving after {self.ready_timeout:g} s"
        return worker, f"worker {worker.pid} did not start ({how})"

    # -- what the signals do

    def reload(self) -> None:
        """Replace every worker, one at a time, each replacement serving before its predecessor stops accepting."""
        self.reload_requested = False
        count = len(self.serving)
        try:
            self.preflight()
        except ConfigError as exc:
            _say(f"reload refused, the {count} running workers keep serving: {exc}")
            return
        began = time.monotonic()
        for index in range(count):
            new, failure = self._start_one()
            if failure is not None:
                _say(f"reload stopped after {index} of {count} workers: {failure}; the running workers keep serving")
                return
            old, self.serving[index] = self.serving[index], new
            self._retire(old)
            # Replaced once it takes no new connection: from then on every new one reaches a new worker.
            self._wait_until(lambda: old.draining or old.exited(), STOP_ACCEPTING_SECONDS)  # noqa: B023
        _say(f"reloaded: {count} worker{'s' if count > 1 else ''} replaced in {time.monotonic() - began:.1f} s")

    def stop(self) -> int:
        """Drain and stop every worker; 0 if all finished within the grace period."""
        # This process's copy of the listener first, so the workers' closes are the last: new connections are then
        # refused, while the connections already waiting are taken by the workers (WorkerServer.shutdown).
        self.listener.close()
        if self.admin is not None:
            self.admin.close()
        for worker in self.serving:
            self._retire(worker)
        self.serving = []
        deadline = time.monotonic() + self.grace + KILL_MARGIN_SECONDS
        while any(not worker.exited() for worker in self.retiring) and time.monotonic() < deadline:
            self._pump(0.1)
        hung = [worker for worker in self.retiring if not worker.exited()]
        for worker in hung:
            _say(f"worker {worker.pid} still busy {self.grace:g} s after it was told to stop: killed")
        for worker in list(self.retiring):
            self._kill(worker)
        self.retiring = []
        return 1 if hung else 0

    def run(self) -> int:
        """Start the workers and supervise them until a stop signal; the exit code of `moxy serve`."""
        self._install_signals()
        try:
            first = [self._spawn() for _ in range(self.count)]
            self.serving = list(first)
            self._wait_until(lambda: all(worker.ready or worker.exited() for worker in first), self.ready_timeout)
            failed = [worker for worker in first if not worker.ready]
            if failed:
                code = failed[0].process.poll()
                how = _exit_status(code) if code is not None else f"not serving after {self.ready_timeout:g} s"
                _say(f"worker {failed[0].pid} did not start ({how}); stopping")
                self.stop()
                # A worker's own refusal (2: bad configuration) is the command's; anything else a failed start.
                return code if code is not None and code > 0 else STARTUP_FAILURE
            while True:
                self._pump(1.0)
                if self.stop_signal is not None:
                    break
                self._reap_retiring()
                self._replace_dead()
                if self.reload_requested:
                    self.reload()
        except _Stop:
            pass
        return self.stop()


def supervise(
    *,
    listening: socket.socket,
    workers: int,
    command: Sequence[str],
    preflight: Callable[[], object],
    admin: socket.socket | None = None,
) -> int:
    """Run `workers` workers on the `listening` socket (see `listen`) and the `admin` one (`listen_admin`), and
    return the exit code."""
    return Supervisor(listening, workers, command, preflight, admin=admin).run()
