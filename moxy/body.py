"""Bodies: the spool a streaming upstream body is written to, the file-backed body several answers share, body
hashing, and the one size from which work over a body leaves the event loop. Imports nothing of Moxy but errors.

Everything blocking here (disk writes, reads, hashing a large body) runs in a worker thread, so the loop keeps
answering other requests while a big body is handled."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from moxy.errors import UpstreamError

__all__ = [
    "MEMORY_BODY_BYTES",
    "OFFLOAD_BYTES",
    "SPOOL_WRITE_BYTES",
    "Body",
    "OpenBody",
    "Spool",
    "digest_bytes",
    "digest_file",
    "offload",
]

# Work over a body this size or larger (hashing it, parsing and validating it) runs in a worker thread: hashlib and
# orjson hold the GIL only in slices, so the event loop keeps answering hits in between. Smaller bodies stay inline,
# where the thread hop costs more than the work.
OFFLOAD_BYTES = 256 * 1024
# A streaming body is held in memory up to this size; past it, it goes to a spool file.
MEMORY_BODY_BYTES = 2 * 1024 * 1024
# Spooled bodies are written in batches of this size, each in a worker thread, so the loop never blocks on disk.
SPOOL_WRITE_BYTES = 1024 * 1024
# Files are hashed and read back in pieces of this size.
_READ_BYTES = 1024 * 1024

_T = TypeVar("_T")


async def offload(size: int, work: Callable[[], _T]) -> _T:
    """Run CPU work over a body of `size` bytes in a thread once it is big enough to stall other requests (a 5 MB
    JSON document takes tens of milliseconds to parse); below OFFLOAD_BYTES it runs inline."""
    if size < OFFLOAD_BYTES:
        return work()
    return await asyncio.to_thread(work)


async def digest_bytes(data: bytes) -> str:
    """The SHA-256 hex digest of `data`, computed off the loop when it is large."""
    return await offload(len(data), lambda: hashlib.sha256(data).hexdigest())


class OpenBody:
    """A body held by an open file descriptor, read with pread so several responses can share it.

    The file may already be unlinked (a spooled upstream body) or replaced in the cache folder; the open
    descriptor keeps the bytes readable until the last response using it is garbage collected."""

    __slots__ = ("__weakref__", "fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, path: str, offset: int, length: int) -> OpenBody:
        return cls(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), offset, length)

    def read(self, start: int, size: int) -> bytes:
        """Up to `size` bytes from position `start` of the body (blocking: call it from a thread)."""
        size = max(0, min(size, self.length - start))
        return os.pread(self.fd, size, self.offset + start) if size else b""


Body = bytes | OpenBody


async def digest_file(body: OpenBody, sample_size: int | None) -> tuple[bytes, str]:
    """Hash the whole file-backed body in a worker thread; returns its first `sample_size` bytes (all of it when
    None) and its SHA-256 hex digest, from one read of the file."""
    return await asyncio.to_thread(_read_and_digest, body, sample_size)


def _read_and_digest(body: OpenBody, sample_size: int | None) -> tuple[bytes, str]:
    digest = hashlib.sha256()
    sample = bytearray()
    position = 0
    while position < body.length:
        data = body.read(position, _READ_BYTES)
        if not data:
            break
        digest.update(data)
        if sample_size is None or len(sample) < sample_size:
            sample += data if sample_size is None else data[: sample_size - len(sample)]
        position += len(data)
    return bytes(sample), digest.hexdigest()


class Spool:
    """Holds a streaming body in memory up to `memory_limit`, then in a spool file written from a worker thread.

    The spool folder lives in the cache folder and, like the disk tier, is an optimisation: when it takes no
    writes (full, read-only, failing), the body is brought back into memory and kept there up to
    `FALLBACK_BYTES`, so the answer is still served. A body past that bound is refused as
    UpstreamError("spool-failed") (a 502, or the stale copy when there is one), never a 500: holding up to
    `max_body_bytes` (50 MiB by default) per concurrent miss in memory is how a full disk would become an
    out-of-memory kill of every request of the worker. `on_failure` hears of each spool failure.

    `finish()` hands the body over, as bytes or as the path of a spool file the caller then owns; `discard()`
    drops it and removes the file."""

    # 8x the usual in-memory threshold: nearly every image and font fits, and a few dozen concurrent large misses
    # during a disk fault stay within a few hundred MiB.
    FALLBACK_BYTES = 16 * 1024 * 1024

    def __init__(self, spool_dir: Path, memory_limit: int, on_failure: Callable[[OSError], None] | None = None) -> None:
        self._spool_dir = spool_dir
        self._memory_limit = memory_limit
        self._on_failure = on_failure
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.length = 0
        self._file: tempfile._TemporaryFileWrapper[bytes] | None = None
        self._spooled = 0  # bytes known to be in the spool file
        self.spool_error: OSError | None = None  # set once spooling failed: the body stays in memory from then on

    async def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self.length += len(chunk)
        if self._file is None and self.spool_error is None and self.length > self._memory_limit:
            try:
                # Created inline (one quick syscall, no await): a cancellation can then never orphan the file.
                # Unbuffered, so a failed write leaves exactly `_spooled` bytes to read back.
                self._file = tempfile.NamedTemporaryFile(
                    dir=self._spool_dir, prefix="moxy-spool-", delete=False, buffering=0
                )
            except OSError as exc:
                await self._stop_spooling(exc, b"")
        if self._file is not None and self._pending_bytes >= SPOOL_WRITE_BYTES:
            await self._write_pending()
        if self.spool_error is not None and self.length > self.FALLBACK_BYTES:
            raise UpstreamError("spool-failed") from self.spool_error

    async def _write_pending(self) -> None:
        assert self._file is not None
        data, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
        before = self._spooled
        try:
            await asyncio.to_thread(self._write_all, self._file, data)
        except OSError as exc:
            await self._stop_spooling(exc, data[self._spooled - before :])

    def _write_all(self, file: tempfile._TemporaryFileWrapper[bytes], data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = file.write(view)  # raw file: may write part of it
            self._spooled += written
            view = view[written:]

    async def _stop_spooling(self, exc: OSError, unwritten: bytes) -> None:
        """Spooling failed: the body so far goes back into memory (within bound) and the spool file away."""
        self.spool_error = exc
        if self._on_failure is not None:
            self._on_failure(exc)
        if self.length > self.FALLBACK_BYTES:
            raise UpstreamError("spool-failed") from exc  # the caller's discard() removes the file
        head = b""
        if self._file is not None:
            try:
                head = await asyncio.to_thread(_read_spooled, self._file.name, self._spooled)
            except OSError as read_error:
                raise UpstreamError("spool-failed") from read_error
            file, self._file = self._file, None
            await asyncio.to_thread(_close_and_unlink, file)
        self._pending = [head, unwritten, *self._pending]
        self._pending_bytes = sum(len(part) for part in self._pending)

    async def finish(self) -> tuple[bytes | None, str | None]:
        """(body, None) when the body stayed in memory, (None, path) when it is in a spool file."""
        if self._file is not None:
            await self._write_pending()
        if self._file is not None:
            try:
                await asyncio.to_thread(self._file.close)
            except OSError as exc:
                await self._stop_spooling(exc, b"")
        if self._file is None:
            return b"".join(self._pending), None
        return None, self._file.name

    async def discard(self) -> None:
        self._pending.clear()
        if self._file is not None:
            file, self._file = self._file, None
            await asyncio.to_thread(_close_and_unlink, file)


def _read_spooled(path: str, length: int) -> bytes:
    parts: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < length:
            chunk = os.pread(fd, length - offset, offset)
            if not chunk:
                raise OSError(f"spool file {path} shorter than the {length} bytes written to it")
            parts.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return b"".join(parts)


def _close_and_unlink(file: tempfile._TemporaryFileWrapper[bytes]) -> None:
    # The file goes even when closing it fails (a deferred write error); on a folder that turned read-only the
    # unlink fails too, and the start-up sweep of temp files removes it later.
    try:
        file.close()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(file.name)
