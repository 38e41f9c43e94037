"""The disk tier: one folder shared by every worker process of a host, crash-safe, byte-bounded LRU.

Layout under `directory`:
    meta/ab/<sid>            encode_entry blob; holds the body too when it is small (<= embed_bytes)
    body/ab/<sid>.<digest>   a large body, raw bytes; named by its SHA-256 so the name is its checksum
    tmp/                     temp files (ours and the fetcher's spools: same filesystem, so rename/link work)
    lock, usage              flock guarding the shared byte counter and eviction

Crash safety: every file is written under tmp/ and renamed into place; the body is in place before the meta file
that names it, so an entry becomes visible only whole. A torn or corrupt file fails its checksum and is removed on
read, which is what keeps a crash from serving bad bytes, power cuts included (a body file is checked against its
SHA-256 the first time each process reads it). With `fsync`, each file and its folder are also flushed before the
rename is relied on, so entries survive a power cut; without it (the default in Moxy's settings, as in other
HTTP caches) a power cut can cost entries, never correctness, and a put costs no disk flush.

LRU: the meta file's mtime is the last-use time (set with an explicit nanosecond clock on put and on every hit).
Eviction scans the folder under an exclusive flock, so several processes agree without a shared index. A sqlite
index would make eviction O(log n) but puts a write transaction (and a lock shared by all workers) on every hit;
the filesystem stays the single source of truth and survives restarts, crashes and manual deletion as it is.
The shared byte counter is only a trigger: every eviction scan recounts the real files and rewrites it.

The disk is an optimisation. A folder that refuses writes (full, read-only, or failing) never fails a request: the
write is skipped whole, a read is a miss, and the `watcher` hears of it (every failure, and once per change of
state). No file is held open for writing between operations (the lock is taken on a read-only descriptor, the
counter is written through a short-lived one), so an operator can remount the folder read-only under a running
Moxy, and writes resume by themselves once it takes them again."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from moxy.body import OpenBody
from moxy.cache.entry import BodyFile, CorruptEntry, Entry, decode_entry, encode_entry, storage_id

__all__ = ["DiskStorage", "DiskWatcher", "fault_kind"]

MiB = 1024 * 1024
TEMP_MAX_AGE = 3600.0
RESCAN_INTERVAL = 600.0
EVICT_TO = 0.9  # evict down to 90 % of the budget, so scans are rare
PROBE_SECONDS = 1.0  # how long a readiness probe of the folder stands for
_USAGE = struct.Struct("<qd")  # bytes in use, unix time of the last full recount
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# The errno classes of a folder that refuses writes; they become metric labels, so they stay few and stable.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def fault_kind(exc: OSError) -> str:
    """ "full", "read-only", or the lower-case errno name ("eio") of a failed disk operation."""
    if exc.errno in _FULL:
        return "full"
    if exc.errno in _READ_ONLY:
        return "read-only"
    return errno.errorcode.get(exc.errno or 0, "unknown").lower()


class DiskWatcher(Protocol):
    """Told what the disk tier could not do; called on the event loop, so it may count and log directly."""

    def failed(self, operation: str, kind: str) -> None:
        """Every failed operation: get, put, touch, delete, probe or open (the folders at start-up)."""

    def changed(self, fault: str | None, operation: str, error: OSError | None) -> None:
        """The folder stopped taking writes (`fault` is the kind) or takes them again (`fault` is None); once per
        change, not once per request."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int, size: int, offset: int = 0) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = os.pread(fd, remaining, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# Bodies read whole on the event loop are at most this large (reading and, the first time, hashing one costs tens
# of microseconds); larger ones are read in a thread.
_LOOP_READ_BYTES = 64 * 1024


class _WouldBlock(Exception):
    """A read on the event loop found bytes that are not in the page cache: the lookup moves to a thread."""


def _read_cached(fd: int, size: int, offset: int = 0) -> bytes:
    """`size` bytes at `offset`, only if the page cache holds them all (RWF_NOWAIT): never waits for the disk."""
    buffer = bytearray(size)
    done = 0
    while done < size:
        try:
            count = os.preadv(fd, [memoryview(buffer)[done:]], offset + done, os.RWF_NOWAIT)
        except BlockingIOError as exc:
            raise _WouldBlock from exc
        if count == 0:
            break
        done += count
    return bytes(buffer[:done])


def _sha256_fd(fd: int, length: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while offset < length:
        chunk = os.pread(fd, min(MiB, length - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


class DiskStorage:
    """Entries in a folder. get() returns bodies up to `inline_bytes` as bytes, larger ones as a BodyFile.

    No OSError leaves this class: a write that fails (full disk, read-only folder, I/O error) is skipped whole,
    leaving no half-written entry and no temp file, and is counted in `dropped_puts` (put and touch); a read that
    fails is a miss. `fault` is the kind of the last failed write (see `fault_kind`) until a write or `probe()`
    succeeds again.

    Bodies are checked against their SHA-256 on read. A body file verified once by this process is not hashed
    again while its identity (inode, size, mtime, ctime) is unchanged: any write to it changes ctime, and hashing
    50 MB on every hit would cost ~30 ms. Silent bit rot in an already-verified file is caught after a restart.

    The constructor creates the folders and sweeps old temp files (blocking, meant for start-up)."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        inline_bytes: int = 64 * 1024,
        embed_bytes: int = 64 * 1024,
        watcher: DiskWatcher | None = None,
        fsync: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._read_on_loop = hasattr(os, "RWF_NOWAIT")
        # Bodies past this are handed over as an open file: the server sends those without copying them through
        # Python (moxy/sending.py), which beats reading them into memory first for anything over a slice or two.
        self.inline_bytes = inline_bytes
        # Bodies this small live inside the meta file: one open and one read per hit, and rewriting them on
        # touch() is cheap. Larger bodies get their own file, which touch() never rewrites.
        self.embed_bytes = min(embed_bytes, inline_bytes)
        self.dropped_puts = 0
        self.watcher = watcher
        self.fault: str | None = None
        self._probed_ok_at: float | None = None  # when a readiness probe last found the folder writable
        self._meta = self.directory / "meta"
        self._body = self.directory / "body"
        self._tmp = self.directory / "tmp"
        self._folders_made = False
        self._wiped = False  # set when the folder's contents vanished: the held lock file is checked again
        # Both opened read-only, and only when first needed: a folder that is read-only at start-up (or remounted
        # so later) must not stop Moxy, and an open writable descriptor would make `mount -o remount,ro` fail.
        self._lock_fd: int | None = None
        self._usage_fd: int | None = None
        self._fds: list[int] = []
        self._close_fds = weakref.finalize(self, _close_all, self._fds)
        # flock excludes other processes (and other instances); threads of this instance share one open file
        # description, which flock does not separate, so they also take this lock.
        self._thread_lock = threading.Lock()
        # Body files verified in this process, by identity: a changed file (any write changes ctime) is hashed
        # again, an unchanged one is not hashed on every hit.
        self._verified: dict[str, tuple[int, int, int, int]] = {}
        try:
            self._make_folders()
        except OSError as exc:
            self._failed("open", exc)  # retried by every later write, so the folder may be fixed while Moxy runs
        self._clean_temp(time.time())

    @property
    def spool_dir(self) -> Path:
        """Where the fetcher spools bodies: on this filesystem, so a put can link or rename from it."""
        return self._tmp

    # -- paths ---------------------------------------------------------------------------

    def _meta_path(self, sid: str) -> Path:
        return self._meta / sid[:2] / sid

    def _body_path(self, sid: str, digest: str) -> Path:
        return self._body / sid[:2] / f"{sid}.{digest}"

    def _temp_path(self) -> Path:
        return self._tmp / f".put-{os.getpid()}-{secrets.token_hex(8)}"

    # -- public API ----------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        # A miss is decided on the loop by one stat of a name in the (dentry-cached) cache folder, far cheaper than
        # the thread hop that reading an entry needs; the uncacheable and cold paths are all misses.
        if not os.path.exists(self._meta_path(storage_id(key))):
            return None
        try:
            if self._read_on_loop:
                # A hit whose files sit in the page cache (the common case for a warm cache) is read right here:
                # a few system calls, against the thread hop a read from the disk itself needs.
                try:
                    return self._get(key, on_loop=True)
                except _WouldBlock:
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._read_on_loop = False  # a filesystem that cannot tell cached bytes apart: threads only
            return await anyio.to_thread.run_sync(self._get, key)
        except OSError as exc:
            # An unreadable file is a miss like a corrupt one; reads say nothing about whether writes work.
            if self.watcher is not None:
                self.watcher.failed("get", fault_kind(exc))
            return None

    async def put(self, entry: Entry) -> None:
        await self._write("put", self._put, entry, False)

    async def touch(self, entry: Entry) -> None:
        """Replace the metadata; the body file (same digest) is kept as it is, not rewritten."""
        await self._write("touch", self._put, entry, True)

    async def delete(self, key: str) -> bool:
        return bool(await self._write("delete", self._delete, key))

    async def probe(self) -> bool:
        """Whether the folder takes writes now (a small temp file written, fsynced and removed); for readiness.

        A success ends a fault, so the state recovers even while no miss arrives to write an entry. A success
        stands for PROBE_SECONDS: readiness is asked by anyone, and a flood of probes would otherwise be a flood
        of fsyncs competing with the cache's own writes. A failure costs no fsync and is always asked again, so
        a recovery shows at once."""
        recent = self._probed_ok_at is not None and time.monotonic() - self._probed_ok_at < PROBE_SECONDS
        # Within the window a stat and an access check stand in for the write: they see a folder that was
        # removed, replaced or remounted read-only since, without an fsync.
        if recent and self.fault is None and self.directory.is_dir() and os.access(self.directory, os.W_OK):
            return True
        writable = bool(await self._write("probe", self._probe))
        self._probed_ok_at = time.monotonic() if writable else None
        return writable

    def counted_usage(self) -> int:
        """Bytes in use by the shared counter every writer keeps up to date (one pread, no scan, no lock)."""
        try:
            counted = self._read_usage()
        except OSError:
            return 0
        return max(0, counted[0]) if counted is not None else 0

    async def usage(self) -> int:
        """Bytes in the folder's entries, recounted from the files (also resets the shared counter)."""
        return await anyio.to_thread.run_sync(self._recount)

    async def aclose(self) -> None:
        self._close_fds()

    # -- faults ----------------------------------------------------------------------------

    async def _write(self, operation: str, work: Callable[..., bool], *args: object) -> bool | None:
        """Run a writing operation in a thread; an OSError skips it (the operation cleans up after itself).

        The result: whether the folder was written (which ends a fault), or None when the operation failed."""
        try:
            wrote = await anyio.to_thread.run_sync(work, *args)
        except OSError as exc:
            if operation in ("put", "touch"):
                self.dropped_puts += 1
            if exc.errno == errno.ENOENT:
                # The folder's contents were removed under us (by hand, a cleaner): make them again next time,
                # or every later write would fail the same way for good.
                self._folders_made = False
                self._wiped = True
            self._failed(operation, exc)
            return None
        if wrote and self.fault is not None:
            self.fault = None
            if self.watcher is not None:
                self.watcher.changed(None, operation, None)
        return wrote

    def _failed(self, operation: str, exc: OSError) -> None:
        kind = fault_kind(exc)
        if self.watcher is not None:
            self.watcher.failed(operation, kind)
        if self.fault != kind:
            self.fault = kind
            if self.watcher is not None:
                self.watcher.changed(kind, operation, exc)

    def _make_folders(self) -> None:
        if self._folders_made:
            return
        for folder in (self._meta, self._body, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._folders_made = True

    def _probe(self) -> bool:
        self._make_folders()
        written: list[Path] = []
        try:
            # Always flushed: a folder whose flushes fail (an I/O error) must not be reported as taking writes.
            os.unlink(self._write_temp(b"ready", written, sync=True))
        finally:
            for path in written:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return True

    # -- reading ---------------------------------------------------------------------------

    def _get(self, key: str, *, on_loop: bool = False) -> Entry | None:
        """The entry of `key`, or None. `on_loop`: read only what the page cache holds and do nothing slow (no
        hashing of a large file, no locking), raising _WouldBlock instead, so it may run on the event loop."""
        sid = storage_id(key)
        meta_path = self._meta_path(sid)
        try:
            fd = os.open(meta_path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            meta_stat = os.fstat(fd)
            blob = _read_cached(fd, meta_stat.st_size) if on_loop else _read_all(fd, meta_stat.st_size)
        finally:
            os.close(fd)
        try:
            entry = decode_entry(blob)
        except CorruptEntry:
            if on_loop:
                raise _WouldBlock from None  # removing it takes the folder's lock: a thread's work
            self._discard(meta_path, blob)
            return None
        if entry.key != key:
            return None  # another key with the same storage id: a miss, never its body
        if isinstance(entry.body, bytes) and len(entry.body) != entry.length:  # the body lives in its own file
            body = self._open_body(sid, entry, meta_path, blob, on_loop=on_loop)
            if body is None:
                return None
            entry = entry.with_body(body)
        with contextlib.suppress(OSError):
            now = time.time_ns()
            os.utime(meta_path, ns=(now, now))  # the LRU clock, seen by every process
        return entry

    def _open_body(
        self, sid: str, entry: Entry, meta_path: Path, meta_blob: bytes, *, on_loop: bool = False
    ) -> bytes | BodyFile | None:
        path = self._body_path(sid, entry.digest)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            if on_loop:
                raise _WouldBlock from None
            # Either a newer put replaced this entry between our two opens (a miss), or the body is gone.
            self._discard(meta_path, meta_blob)
            return None
        handed_over = False
        try:
            st = os.fstat(fd)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            name = str(path)
            known = self._verified.get(name) == identity
            if st.st_size != entry.length:
                if on_loop:
                    raise _WouldBlock
                ok, data = False, None
            elif entry.length <= self.inline_bytes:
                if on_loop and entry.length > _LOOP_READ_BYTES:
                    raise _WouldBlock  # copying (and, the first time, hashing) it would hold the loop: a thread's work
                data = _read_cached(fd, entry.length) if on_loop else _read_all(fd, entry.length)
                ok = known or (len(data) == entry.length and hashlib.sha256(data).hexdigest() == entry.digest)
            else:
                if on_loop and not known:
                    raise _WouldBlock  # the first read of a large body hashes all of it
                data = None
                ok = known or _sha256_fd(fd, entry.length) == entry.digest
            if not ok and on_loop:
                raise _WouldBlock
            if ok and data is None:
                # The descriptor just checked is the one the answer is sent from: no second open, no second hop.
                opened = OpenBody(fd, 0, entry.length)
                handed_over = True
        finally:
            if not handed_over:
                os.close(fd)
        if not ok:
            self._verified.pop(name, None)
            self._discard(meta_path, meta_blob, body=path)
            return None
        if not known:
            if len(self._verified) > 16384:
                self._verified.clear()
            self._verified[name] = identity
        return data if data is not None else BodyFile(name, 0, entry.length, opened)

    def _discard(self, meta_path: Path, meta_blob: bytes, *, body: Path | None = None) -> None:
        """Remove a broken entry, unless a writer has meanwhile put a new version in its place.

        Under the lock, because commits (meta rename + removal of the superseded bodies) happen under it too:
        a meta file still holding the bytes we read is the broken one, not a newer version."""
        with self._locked():
            try:
                if meta_path.read_bytes() == meta_blob:
                    os.unlink(meta_path)
            except FileNotFoundError:
                pass
            if body is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(body)

    # -- writing ---------------------------------------------------------------------------

    def _put(self, entry: Entry, touching: bool) -> bool:
        """Store (or, `touching`, refresh) the entry; whether anything was written. An OSError is raised only once
        every file this put made is gone again."""
        self._make_folders()
        sid = storage_id(entry.key)
        meta_path = self._meta_path(sid)
        embed = entry.length <= self.embed_bytes
        body_path = None if embed else self._body_path(sid, entry.digest)
        if embed:
            body_bytes = self._small_body(entry, meta_path if touching else None)
            if body_bytes is None:
                return False  # touch() of an entry whose body is nowhere at hand: nothing to update
            meta_blob = encode_entry(entry.with_body(body_bytes), include_body=True)
            body_present = True
        else:
            body_present = _size_of(body_path) == entry.length if body_path is not None else False
            if not body_present and not (isinstance(entry.body, BodyFile) or len(entry.body) == entry.length):
                if touching:
                    return False
                raise ValueError(f"entry body is {len(entry.body)} bytes, entry says {entry.length}")
            meta_blob = encode_entry(entry.with_body(b""), include_body=False)
        if len(meta_blob) + (0 if embed else entry.length) > self.max_bytes:
            self._delete_sid(sid)  # cannot hold it: at least drop the older copy
            return True
        added = len(meta_blob) + (0 if body_present else entry.length)
        self._add_usage(added, pending=True)
        written: list[Path] = []  # files to remove if the put fails before its commit
        try:
            if body_path is not None and not body_present:
                self._write_body(entry, body_path, written)
            temp = self._write_temp(meta_blob, written)
            usage = self._commit(sid, temp, body_path, added, written)
        except OSError as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):  # drift is corrected by the next recount
                self._add_usage(-added)
            if isinstance(exc, FileNotFoundError) and touching:
                return False  # the source body vanished (evicted) while refreshing: nothing to keep
            raise
        if usage is None:
            return False
        if self.fsync:
            with contextlib.suppress(OSError):
                _fsync_dir(meta_path.parent)  # durability of the rename; the entry is already whole either way
        if usage > self.max_bytes:
            self._evict()
        return True

    def _commit(self, sid: str, temp: Path, body_path: Path | None, added: int, written: list[Path]) -> int | None:
        """Make the new version visible and drop the superseded bodies; the usage after, or None when abandoned.

        Under the lock, so two writers of one key cannot delete each other's body: a writer whose body was
        removed by a concurrent commit (it is superseded) abandons its put, and the other version stays whole."""
        meta_path = self._meta_path(sid)
        with self._locked():
            if body_path is not None and not body_path.exists():
                os.unlink(temp)
                written.clear()
                self._add_usage_locked(-added)
                return None
            old_meta = _size_of(meta_path) or 0
            meta_path.parent.mkdir(exist_ok=True)
            os.replace(temp, meta_path)
            written.clear()  # committed: nothing of this put may be removed any more
            freed = old_meta + self._remove_bodies(sid, keep=body_path)
            return self._add_usage_locked(-freed)

    def _small_body(self, entry: Entry, stored_meta: Path | None) -> bytes | None:
        if isinstance(entry.body, bytes) and len(entry.body) == entry.length:
            return entry.body
        if isinstance(entry.body, BodyFile):
            try:
                fd = os.open(entry.body.path, os.O_RDONLY | _O_CLOEXEC)
            except FileNotFoundError:
                return None
            try:
                data = _read_all(fd, entry.body.length, entry.body.offset)
            finally:
                os.close(fd)
            return data if len(data) == entry.length else None
        if stored_meta is not None:
            # touch() given metadata only: reuse the body already stored, when it is the same one.
            try:
                old = decode_entry(stored_meta.read_bytes())
            except (OSError, CorruptEntry):
                return None
            if old.key == entry.key and old.digest == entry.digest and isinstance(old.body, bytes):
                return old.body if len(old.body) == old.length else None
            return None
        raise ValueError(f"entry body is {len(entry.body)} bytes, entry says {entry.length}")

    def _write_body(self, entry: Entry, target: Path, written: list[Path]) -> None:
        body = entry.body
        if isinstance(body, bytes):
            self._write_file(target, body, written)
            return
        temp = self._temp_path()
        written.append(temp)
        source = os.open(body.path, os.O_RDONLY | _O_CLOEXEC)
        try:
            linked = False
            if body.offset == 0 and os.fstat(source).st_size == body.length:
                # Whole file: a hard link shares the blocks without copying and leaves the source path as it is.
                with contextlib.suppress(OSError):
                    os.link(body.path, temp)
                    linked = True
            if not linked:
                self._copy(source, temp, body)
        finally:
            os.close(source)
        if self.fsync:
            fd = os.open(temp, os.O_RDONLY | _O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        target.parent.mkdir(exist_ok=True)
        os.replace(temp, target)
        # Not removed if the meta write then fails: a concurrent put of the same version may already name it.
        # An unnamed body is swept by the next recount (or replaced by the next put of this key).
        written.remove(temp)
        if self.fsync:
            _fsync_dir(target.parent)

    @staticmethod
    def _copy(source: int, temp: Path, body: BodyFile) -> None:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
        try:
            offset, copied = body.offset, 0
            while copied < body.length:
                try:
                    count = os.copy_file_range(source, fd, body.length - copied, offset + copied)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    chunk = os.pread(source, min(MiB, body.length - copied), offset + copied)
                    count = os.write(fd, chunk) if chunk else 0
                if count == 0:
                    raise OSError(errno.EIO, "source body shorter than its stated length")
                copied += count
        finally:
            os.close(fd)

    def _write_file(self, target: Path, data: bytes, written: list[Path]) -> None:
        """Atomically replace `target` with `data`: temp file, fsync, explicit mtime, rename, fsync folder."""
        temp = self._write_temp(data, written)
        target.parent.mkdir(exist_ok=True)
        os.replace(temp, target)
        written.remove(temp)
        if self.fsync:
            _fsync_dir(target.parent)

    def _write_temp(self, data: bytes, written: list[Path], *, sync: bool | None = None) -> Path:
        """`data` in a new temp file, its mtime (the LRU clock) set to now; fsynced when `sync` (default: the
        tier's `fsync`)."""
        temp = self._temp_path()
        written.append(temp)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync if sync is None else sync:
                os.fsync(fd)
            now = time.time_ns()
            os.utime(fd, ns=(now, now))
        finally:
            os.close(fd)
        return temp

    # -- deleting ---------------------------------------------------------------------------

    def _delete(self, key: str) -> bool:
        sid = storage_id(key)
        meta_path = self._meta_path(sid)
        try:
            blob = meta_path.read_bytes()
        except FileNotFoundError:
            return False
        with contextlib.suppress(CorruptEntry):
            if decode_entry(blob).key != key:
                return False  # the file belongs to another key that shares the storage id
        return self._delete_sid(sid) > 0

    def _delete_sid(self, sid: str) -> int:
        freed = 0
        meta_path = self._meta_path(sid)
        with self._locked():
            size = _size_of(meta_path)
            if size is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(meta_path)  # first: the entry disappears before its body does
                    freed += size
            freed += self._remove_bodies(sid, keep=None)
            if freed:
                self._add_usage_locked(-freed)
        return freed

    def _remove_bodies(self, sid: str, keep: Path | None) -> int:
        """Delete this sid's body files other than `keep` (an older version's body); bytes freed."""
        freed = 0
        folder = self._body / sid[:2]
        prefix = sid + "."
        try:
            candidates = [item for item in os.scandir(folder) if item.name.startswith(prefix)]
        except FileNotFoundError:
            return 0
        for item in candidates:
            if keep is not None and item.name == keep.name:
                continue
            with contextlib.suppress(FileNotFoundError):
                size = item.stat().st_size
                os.unlink(item.path)
                self._verified.pop(item.path, None)
                freed += size
        return freed

    # -- accounting and eviction ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._lock_fd is not None and self._wiped and not _names(self._lock_fd, self.directory / "lock"):
                # The folder was emptied under us: the descriptor holds a lock file no other worker can see any
                # more, so it would exclude nobody. Take the one in the folder instead.
                self._fds.remove(self._lock_fd)
                os.close(self._lock_fd)
                self._lock_fd = None
            self._wiped = False
            if self._lock_fd is None:
                # flock needs no write access; O_CREAT does not fail on a read-only folder that already has it.
                self._lock_fd = os.open(self.directory / "lock", os.O_RDONLY | os.O_CREAT | _O_CLOEXEC, 0o600)
                self._fds.append(self._lock_fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read_usage(self) -> tuple[int, float] | None:
        if self._usage_fd is None:
            try:
                fd = os.open(self.directory / "usage", os.O_RDONLY | _O_CLOEXEC)
            except FileNotFoundError:
                return None  # not counted yet: the caller recounts, which creates it
            if self._usage_fd is None:
                self._usage_fd = fd
                self._fds.append(fd)
            else:
                os.close(fd)  # another thread opened it meanwhile
        raw = os.pread(self._usage_fd, _USAGE.size, 0)
        if len(raw) != _USAGE.size:
            return None
        used, scanned_at = _USAGE.unpack(raw)
        return used, scanned_at

    def _write_usage(self, used: int, scanned_at: float) -> None:
        # A descriptor for this write only: a writable one kept open would block a read-only remount.
        fd = os.open(self.directory / "usage", os.O_WRONLY | os.O_CREAT | _O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, _USAGE.pack(used, scanned_at), 0)
        finally:
            os.close(fd)

    def _add_usage(self, delta: int, *, pending: bool = False) -> int:
        with self._locked():
            return self._add_usage_locked(delta, pending=pending)

    def _add_usage_locked(self, delta: int, *, pending: bool = False) -> int:
        """Add to the shared counter and return it; recount from the files when it is missing or old.

        `pending`: the delta is about bytes not yet written (a reservation), so a recount adds it."""
        state = self._read_usage()
        if state is None or time.time() - state[1] > RESCAN_INTERVAL or state[0] + delta < 0:
            # First use of the folder, a periodic check, or drift (races between processes): recount.
            total = self._scan_locked(evict=False) + (delta if pending else 0)
            self._write_usage(total, time.time())
            return total
        used = state[0] + delta
        self._write_usage(used, state[1])
        return used

    def _recount(self) -> int:
        with self._locked():
            return self._scan_locked(evict=False)

    def _evict(self) -> None:
        with self._locked():
            self._scan_locked(evict=True)

    def _scan_locked(self, *, evict: bool) -> int:
        """Recount every file (lock held); when `evict`, remove least-recently-used entries down to EVICT_TO."""
        now = time.time()
        metas: list[tuple[int, str, int]] = []  # (last use ns, sid, size)
        for folder in _subfolders(self._meta):
            for item in _scan(folder):
                with contextlib.suppress(FileNotFoundError):
                    st = item.stat()
                    metas.append((st.st_mtime_ns, item.name, st.st_size))
        known = {sid for _, sid, _ in metas}
        bodies: dict[str, list[tuple[str, int]]] = {}
        total = sum(size for _, _, size in metas)
        for folder in _subfolders(self._body):
            for item in _scan(folder):
                with contextlib.suppress(FileNotFoundError):
                    st = item.stat()
                    sid = item.name.partition(".")[0]
                    if sid not in known and now - st.st_mtime > TEMP_MAX_AGE:
                        os.unlink(item.path)  # orphan of a crashed put (body renamed, meta never was)
                        continue
                    bodies.setdefault(sid, []).append((item.path, st.st_size))
                    total += st.st_size
        if evict and total > self.max_bytes:
            target = int(self.max_bytes * EVICT_TO)
            for _, sid, size in sorted(metas):
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._meta_path(sid))
                total -= size
                for path, body_size in bodies.pop(sid, []):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        self._verified.pop(path, None)
                    total -= body_size
        with contextlib.suppress(OSError):  # the count is right either way; a writer rewrites the counter
            self._write_usage(total, now)
        return total

    def _clean_temp(self, now: float) -> None:
        """Remove temp files left by crashed writers (ours and the fetcher's) once they are an hour old."""
        for item in _scan(self._tmp):
            with contextlib.suppress(OSError):  # an unwritable folder is swept at a later start
                if now - item.stat().st_mtime > TEMP_MAX_AGE:
                    os.unlink(item.path)


def _names(fd: int, path: Path) -> bool:
    """Whether `path` is the file `fd` has open (not removed or replaced since)."""
    try:
        held, named = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _size_of(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _subfolders(folder: Path) -> list[Path]:
    return [Path(item.path) for item in _scan(folder) if item.is_dir(follow_symlinks=False)]


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as items:
            return list(items)
    except FileNotFoundError:
        return []
