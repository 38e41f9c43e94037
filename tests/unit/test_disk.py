"""The disk tier beyond the contract: damage detection, restarts, LRU eviction, several workers on one folder."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moxy.cache import BodyFile, DiskStorage, Entry, storage_id
from moxy.cache.disk import MiB
from tests.entries import make_entry as entry_of

pytestmark = pytest.mark.anyio


def make_entry(name: str, body: bytes) -> Entry:
    return entry_of(
        f"https://img.example/{name}",
        body,
        accept="image/*",
        stored_at=1_700_000_000.0,
        lifetime=600.0,
        stale_while_revalidate=60.0,
        stale_if_error=3600.0,
    )


def meta_file(root: Path, entry: Entry) -> Path:
    sid = storage_id(entry.key)
    return root / "meta" / sid[:2] / sid


SMALL_INLINE = 64 * 1024


def body_file(root: Path, entry: Entry) -> Path:
    sid = storage_id(entry.key)
    return root / "body" / sid[:2] / f"{sid}.{entry.digest}"


def bytes_on_disk(root: Path) -> int:
    return sum(
        path.stat().st_size for folder in ("meta", "body") for path in (root / folder).rglob("*") if path.is_file()
    )


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def read_body(entry: Entry) -> bytes:
    if isinstance(entry.body, bytes):
        return entry.body
    with open(entry.body.path, "rb") as file:
        file.seek(entry.body.offset)
        return file.read(entry.body.length)


# -- damage ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 12, 40, -40, -1])
async def test_flipped_byte_in_meta_is_a_miss_and_removed(tmp_path: Path, position: int):
    disk = DiskStorage(tmp_path, 64 * MiB)
    entry = make_entry("a.png", b"small body" * 10)
    await disk.put(entry)
    flip(meta_file(tmp_path, entry), position)
    assert await disk.get(entry.key) is None
    assert not meta_file(tmp_path, entry).exists()
    await disk.put(entry)  # a later put replaces it cleanly
    got = await disk.get(entry.key)
    assert got is not None and got.body == entry.body


@pytest.mark.parametrize("inline_bytes", [MiB, 1024])  # body read as bytes, or handed over as a BodyFile
async def test_flipped_byte_in_a_body_file_is_a_miss_and_removed(tmp_path: Path, inline_bytes: int):
    entry = make_entry("big.png", os.urandom(200_000))
    await DiskStorage(tmp_path, 64 * MiB).put(entry)
    flip(body_file(tmp_path, entry), 100_000)
    disk = DiskStorage(tmp_path, 64 * MiB, inline_bytes=inline_bytes)
    assert await disk.get(entry.key) is None
    assert not body_file(tmp_path, entry).exists()
    assert not meta_file(tmp_path, entry).exists()


@pytest.mark.parametrize("which", ["meta", "body"])
async def test_truncated_file_is_a_miss(tmp_path: Path, which: str):
    disk = DiskStorage(tmp_path, 64 * MiB)
    entry = make_entry("big.png", os.urandom(200_000))
    await disk.put(entry)
    path = meta_file(tmp_path, entry) if which == "meta" else body_file(tmp_path, entry)
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)
    assert await DiskStorage(tmp_path, 64 * MiB).get(entry.key) is None
    await disk.put(entry)
    assert await disk.get(entry.key) is not None


async def test_foreign_file_in_place_of_meta_is_a_miss(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB)
    entry = make_entry("a.png", b"body")
    path = meta_file(tmp_path, entry)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"<html>not an entry</html>")
    assert await disk.get(entry.key) is None
    assert not path.exists()


async def test_missing_body_file_is_a_miss(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB)
    entry = make_entry("big.png", os.urandom(100_000))
    await disk.put(entry)
    body_file(tmp_path, entry).unlink()
    assert await disk.get(entry.key) is None


# -- shapes of bodies --------------------------------------------------------------------------------------------


async def test_body_as_bytes_up_to_inline_then_as_file(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB, inline_bytes=150_000)
    under, over = make_entry("under", os.urandom(150_000)), make_entry("over", os.urandom(150_001))
    await disk.put(under)
    await disk.put(over)
    got_under, got_over = await disk.get(under.key), await disk.get(over.key)
    assert got_under is not None and got_under.body == under.body
    assert got_over is not None and isinstance(got_over.body, BodyFile)
    assert got_over.body.length == 150_001 and read_body(got_over) == over.body
    assert Path(got_over.body.path).is_relative_to(tmp_path)


async def test_touch_does_not_rewrite_a_large_body(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB, inline_bytes=1024)
    entry = make_entry("big.png", os.urandom(300_000))
    await disk.put(entry)
    stored = await disk.get(entry.key)
    assert stored is not None
    before = body_file(tmp_path, entry).stat()
    meta_before = meta_file(tmp_path, entry).stat().st_ino
    refreshed = stored.refreshed(
        stored_at=1_800_000_000.0,
        age=0.0,
        lifetime=99.0,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        must_revalidate=False,
        no_cache=False,
        etag='"new"',
        last_modified=None,
    )
    await disk.touch(refreshed)
    after = body_file(tmp_path, entry).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert meta_file(tmp_path, entry).stat().st_ino != meta_before
    got = await disk.get(entry.key)
    assert got is not None and got.etag == '"new"' and got.lifetime == 99.0 and read_body(got) == entry.body


async def test_touch_with_metadata_only_reuses_the_stored_small_body(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB)
    entry = make_entry("a.png", b"small")
    await disk.put(entry)
    await disk.touch(entry.with_body(b"").refreshed(
        stored_at=1.0, age=0.0, lifetime=5.0, stale_while_revalidate=0.0, stale_if_error=0.0,
        must_revalidate=False, no_cache=False, etag='"x"', last_modified=None,
    ))  # fmt: skip
    got = await disk.get(entry.key)
    assert got is not None and got.body == b"small" and got.etag == '"x"'


async def test_touch_of_an_evicted_entry_is_quiet(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB)
    gone = make_entry("gone.png", b"x" * 100_000).with_body(BodyFile(str(tmp_path / "nope"), 0, 100_000))
    await disk.touch(gone)
    assert await disk.get(gone.key) is None


async def test_put_refuses_a_body_of_the_wrong_length(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB)
    entry = make_entry("a.png", b"abc")
    with pytest.raises(ValueError):
        await disk.put(entry.with_body(b"ab"))


async def test_spooled_source_stays_intact_and_cache_copy_is_independent_of_its_path(tmp_path: Path):
    disk = DiskStorage(tmp_path / "cache", 64 * MiB, inline_bytes=1024)
    body = os.urandom(500_000)
    spool = disk.spool_dir / "fetch-1"
    spool.write_bytes(body)
    entry = make_entry("big.png", body).with_body(BodyFile(str(spool), 0, len(body)))
    await disk.put(entry)
    assert spool.read_bytes() == body
    os.unlink(spool)
    got = await disk.get(entry.key)
    assert got is not None and read_body(got) == body


# -- restarts, workers, eviction ---------------------------------------------------------------------------------------


async def test_restart_sees_entries(tmp_path: Path):
    first = DiskStorage(tmp_path, 64 * MiB)
    small, large = make_entry("s", b"small"), make_entry("l", os.urandom(2 * MiB))
    await first.put(small)
    await first.put(large)
    await first.aclose()
    second = DiskStorage(tmp_path, 64 * MiB)
    got_small, got_large = await second.get(small.key), await second.get(large.key)
    assert got_small is not None and got_small.body == b"small"
    assert got_large is not None and read_body(got_large) == large.body
    assert await second.usage() == bytes_on_disk(tmp_path)


async def test_two_workers_share_one_folder(tmp_path: Path):
    one, two = DiskStorage(tmp_path, 64 * MiB), DiskStorage(tmp_path, 64 * MiB)
    entry = make_entry("a.png", b"shared")
    await one.put(entry)
    got = await two.get(entry.key)
    assert got is not None and got.body == b"shared"
    assert await two.delete(entry.key) is True
    assert await one.get(entry.key) is None


def _entries(count: int, size: int) -> list[Entry]:
    return [make_entry(f"{n:04d}.png", bytes([n % 256]) * size) for n in range(count)]


async def _entry_size(tmp_path: Path, size: int) -> int:
    probe = DiskStorage(tmp_path / "probe", 64 * MiB)
    await probe.put(make_entry("9999.png", b"\0" * size))
    return await probe.usage()


@pytest.mark.parametrize("body_size", [10_000, 100_000])  # in the meta file, and in a body file of its own
async def test_eviction_removes_the_least_recently_used(tmp_path: Path, body_size: int):
    size = await _entry_size(tmp_path, body_size)
    root = tmp_path / "cache"
    # Two processes' worth of instances: the read happens in one, the put that evicts in the other.
    writer = DiskStorage(root, int(size * 3.4))
    reader = DiskStorage(root, int(size * 3.4))
    a, b, c, d = _entries(4, body_size)
    for entry in (a, b, c):
        await writer.put(entry)
    assert await reader.get(a.key) is not None  # a is now the most recently used
    await writer.put(d)
    assert await writer.get(b.key) is None
    for entry in (a, c, d):
        assert await writer.get(entry.key) is not None
    assert bytes_on_disk(root) <= size * 3.4
    assert not list((root / "body").rglob(f"{storage_id(b.key)}.*"))


async def test_total_stays_under_the_budget(tmp_path: Path):
    budget = 200_000
    disk = DiskStorage(tmp_path, budget)
    for n, entry in enumerate(_entries(40, 15_000) + [make_entry("large", os.urandom(90_000))]):
        await disk.put(entry)
        assert bytes_on_disk(tmp_path) <= budget, f"after put {n}"
    assert await disk.get(make_entry("large", b"").key) is not None  # the newest survives its own eviction


async def test_an_entry_larger_than_the_budget_is_not_kept_and_drops_the_old_copy(tmp_path: Path):
    disk = DiskStorage(tmp_path, 50_000)
    await disk.put(make_entry("x", b"old"))
    await disk.put(make_entry("x", os.urandom(60_000)))
    assert await disk.get(make_entry("x", b"").key) is None
    assert bytes_on_disk(tmp_path) == 0


async def test_usage_counter_survives_restart_and_drift(tmp_path: Path):
    disk = DiskStorage(tmp_path, 64 * MiB)
    for entry in _entries(5, 1000):
        await disk.put(entry)
    (tmp_path / "usage").write_bytes(b"")  # lost counter: recounted from the files
    await disk.put(make_entry("one-more", b"z" * 1000))
    assert await disk.usage() == bytes_on_disk(tmp_path)


# -- temp files, orphans, full disk ----------------------------------------------------------------------------------


async def test_stale_temp_files_and_orphan_bodies_are_cleaned(tmp_path: Path):
    DiskStorage(tmp_path, 64 * MiB)
    hour_ago = time.time() - 3700
    old_temp, new_temp = tmp_path / "tmp" / ".put-1-old", tmp_path / "tmp" / "fetch-in-progress"
    orphan = tmp_path / "body" / "ab" / ("ab" + "1" * 62 + ".deadbeef")
    young_orphan = tmp_path / "body" / "ab" / ("ab" + "2" * 62 + ".cafe")
    orphan.parent.mkdir(parents=True)
    for path in (old_temp, new_temp, orphan, young_orphan):
        path.write_bytes(b"leftover")
    for path in (old_temp, orphan):
        os.utime(path, (hour_ago, hour_ago))
    disk = DiskStorage(tmp_path, 64 * MiB)
    assert not old_temp.exists() and new_temp.exists()
    await disk.usage()  # a recount also drops bodies no entry names (a crash between the two renames)
    assert not orphan.exists()
    assert young_orphan.exists()  # may be a put in progress in another worker


class Watcher:
    """Records what the disk tier reports, in order."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []
        self.changes: list[tuple[str | None, str]] = []

    def failed(self, operation: str, kind: str) -> None:
        self.failures.append((operation, kind))

    def changed(self, fault: str | None, operation: str, error: OSError | None) -> None:
        assert (fault is None) == (error is None)
        self.changes.append((fault, operation))


def temp_files(root: Path) -> list[Path]:
    return list((root / "tmp").iterdir())


def refuse_writes(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """Make every write under `root` (write-side open, mkdir, unlink, rename, link, utime) fail with `code`.

    Opening an existing file read-only (with or without O_CREAT) still works there, as it does on a read-only
    mount; that is how the lock is taken."""
    real_open, real_mkdir = os.open, os.mkdir

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        inside = str(path).startswith(str(root))
        writing = flags & (os.O_WRONLY | os.O_RDWR) or (flags & os.O_CREAT and not os.path.exists(path))
        if inside and writing:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if str(path).startswith(str(root)) and not os.path.isdir(path):
            raise OSError(code, os.strerror(code), str(path))
        real_mkdir(path, mode, dir_fd=dir_fd)

    def refused(real: Callable[..., None]) -> Callable[..., None]:
        def call(path: Any, *args: Any, **kwargs: Any) -> None:
            if str(path).startswith(str(root)):
                raise OSError(code, os.strerror(code), str(path))
            real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name in ("unlink", "replace", "rename", "link", "utime"):
        monkeypatch.setattr(os, name, refused(getattr(os, name)))


@pytest.mark.parametrize("body_size", [1000, 300_000])
async def test_full_disk_put_is_quiet_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body_size: int
):
    watcher = Watcher()
    disk = DiskStorage(tmp_path, 64 * MiB, watcher=watcher)
    entry = make_entry("a.png", os.urandom(body_size))
    real_write = os.write

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    await disk.put(entry)
    await disk.put(entry)
    monkeypatch.undo()
    assert disk.dropped_puts == 2
    assert disk.fault == "full"
    assert watcher.failures == [("put", "full"), ("put", "full")]
    assert watcher.changes == [("full", "put")], "one report per change of state, not one per failure"
    assert await disk.get(entry.key) is None
    assert temp_files(tmp_path) == []
    assert bytes_on_disk(tmp_path) == 0
    await disk.put(entry)
    assert await disk.get(entry.key) is not None
    assert disk.fault is None
    assert watcher.changes == [("full", "put"), (None, "put")]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOSPC, "full"),
        (errno.EDQUOT, "full"),
        (errno.EFBIG, "full"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "read-only"),
        (errno.EPERM, "read-only"),
        (errno.EIO, "eio"),
    ],
)
@pytest.mark.parametrize("body_size", [1000, 300_000])
async def test_failed_writes_are_skipped_whole_and_classified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, kind: str, body_size: int
):
    # The disk is an optimisation: whatever the OSError, the put is skipped (never raised into a request).
    watcher = Watcher()
    disk = DiskStorage(tmp_path, 64 * MiB, watcher=watcher)
    entry = make_entry("a.png", os.urandom(body_size))

    def broken(fd: int, data: bytes | memoryview) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", broken)
    await disk.put(entry)
    await disk.touch(entry)
    assert await disk.probe() is False
    monkeypatch.undo()
    assert watcher.failures == [("put", kind), ("touch", kind), ("probe", kind)]
    assert watcher.changes == [(kind, "put")]
    assert temp_files(tmp_path) == []
    assert bytes_on_disk(tmp_path) == 0
    assert await disk.get(entry.key) is None


async def test_read_only_folder_skips_writes_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    watcher = Watcher()
    disk = DiskStorage(tmp_path, 64 * MiB, inline_bytes=SMALL_INLINE, watcher=watcher)
    kept = make_entry("kept.png", os.urandom(200_000))
    await disk.put(kept)
    spooled = tmp_path / "tmp" / "moxy-spool-x"
    spooled.write_bytes(os.urandom(300_000))
    from_file = make_entry("file.png", spooled.read_bytes())
    from_file = from_file.with_body(BodyFile(str(spooled), 0, from_file.length))
    small = make_entry("small.png", b"small body")
    used = bytes_on_disk(tmp_path)

    refuse_writes(monkeypatch, tmp_path, errno.EROFS)
    await disk.put(from_file)
    await disk.put(small)
    assert await disk.delete(kept.key) is False  # could not delete: the copy stays, and is still served
    got = await disk.get(kept.key)
    assert got is not None and read_body(got) == read_body(kept)
    assert await disk.probe() is False
    assert disk.fault == "read-only"
    assert watcher.changes == [("read-only", "put")]
    assert [operation for operation, _ in watcher.failures] == ["put", "put", "delete", "probe"]
    assert temp_files(tmp_path) == [spooled]
    assert bytes_on_disk(tmp_path) == used

    monkeypatch.undo()  # writable again: no restart, the next write (here a probe) ends the fault
    assert await disk.probe() is True
    assert disk.fault is None
    assert watcher.changes == [("read-only", "put"), (None, "probe")]
    await disk.put(small)
    assert await disk.get(small.key) is not None


async def test_starts_on_a_folder_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "cache"
    root.mkdir()
    watcher = Watcher()
    refuse_writes(monkeypatch, root, errno.EACCES)
    disk = DiskStorage(root, 64 * MiB, watcher=watcher)
    assert disk.fault == "read-only"
    assert watcher.failures == [("open", "read-only")]
    entry = make_entry("a.png", b"body")
    await disk.put(entry)
    assert await disk.get(entry.key) is None
    assert disk.counted_usage() == 0
    monkeypatch.undo()
    await disk.put(entry)  # makes the folders it could not make at start-up
    assert await disk.get(entry.key) is not None
    assert disk.fault is None


async def test_unreadable_entry_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    watcher = Watcher()
    disk = DiskStorage(tmp_path, 64 * MiB, watcher=watcher)
    entry = make_entry("a.png", b"body")
    await disk.put(entry)
    real_open = os.open

    def denied(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if str(path).startswith(str(tmp_path / "meta")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", denied)
    assert await disk.get(entry.key) is None
    monkeypatch.undo()
    assert watcher.failures == [("get", "read-only")]
    assert disk.fault is None, "a failed read says nothing about writes"
    assert await disk.get(entry.key) is not None


async def test_holds_no_writable_descriptor_between_operations(tmp_path: Path):
    # A writable descriptor kept open would make `mount -o remount,ro` of the cache folder fail with EBUSY.
    disk = DiskStorage(tmp_path, 64 * MiB)
    for size in (100, 300_000):
        entry = make_entry(f"{size}.png", os.urandom(size))
        await disk.put(entry)
        assert await disk.get(entry.key) is not None
    assert disk.counted_usage() > 0
    writable = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            flags = int(Path(f"/proc/self/fdinfo/{name}").read_text().split("flags:")[1].split()[0], 8)
            if target.startswith(str(tmp_path)) and flags & os.O_ACCMODE != os.O_RDONLY:
                writable.append(target)
    assert writable == []


async def test_concurrent_writers_and_readers_of_one_key(tmp_path: Path):
    import anyio

    one, two = DiskStorage(tmp_path, 64 * MiB, inline_bytes=1024), DiskStorage(tmp_path, 64 * MiB, inline_bytes=1024)
    versions = [make_entry("hot.png", bytes([n]) * (50_000 + n * 1000)) for n in range(12)]
    seen: list[Entry | None] = []

    async with anyio.create_task_group() as group:
        for n, version in enumerate(versions):
            group.start_soon((one if n % 2 else two).put, version)
            group.start_soon(_read_into, two if n % 2 else one, versions[0].key, seen)
    digests = {version.digest: version.body for version in versions}
    for got in seen:
        if got is not None:  # whatever a reader saw is one whole version, never a mix
            assert read_body(got) == digests[got.digest]
    final = await one.get(versions[0].key)
    assert final is not None and read_body(final) == digests[final.digest]
    assert len(list((tmp_path / "body").rglob("*.*"))) == 1  # older versions' bodies are gone
    assert await one.usage() == bytes_on_disk(tmp_path)


async def _read_into(disk: DiskStorage, key: str, seen: list[Entry | None]) -> None:
    got = await disk.get(key)
    if got is not None and isinstance(got.body, BodyFile):
        try:
            got = got.with_body(read_body(got))
        except FileNotFoundError:
            return  # replaced by a newer version between get and open: the proxy treats this as a miss
    seen.append(got)


async def test_a_flood_of_readiness_probes_is_one_fsync_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskStorage(tmp_path / "cache", 64 * MiB)
    synced: list[int] = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    for _ in range(200):
        assert await disk.probe() is True
    assert 1 <= len(synced) <= 4, "a success stands for a second; it is not redone per request"


async def test_a_folder_emptied_under_a_running_tier_is_made_again(tmp_path: Path) -> None:
    # Found in review: the sub-folders were made once, so after an operator emptied the cache folder every write
    # (and every readiness probe, and the upstream spool inside it) failed for good.
    import shutil

    folder = tmp_path / "cache"
    disk = DiskStorage(folder, 64 * MiB)
    await disk.put(make_entry("1.png", b"\x89PNG" + b"a" * 5000))
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    await disk.put(make_entry("2.png", b"\x89PNG" + b"b" * 5000))  # fails: the folders are gone
    assert disk.fault == "enoent"
    assert await disk.probe() is True
    assert disk.spool_dir.is_dir()
    stored = make_entry("3.png", b"\x89PNG" + b"c" * 5000)
    await disk.put(stored)
    found = await disk.get(stored.key)
    assert found is not None and found.length == stored.length
    assert (folder / "lock").exists(), "the lock every worker shares is the one in the folder again"
    await disk.aclose()


# -- flushing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False])
async def test_puts_flush_only_when_asked_and_entries_read_back_whole_either_way(
    tmp_path: Path, flushed: list[int], fsync: bool
) -> None:
    storage = DiskStorage(tmp_path / "cache", 64 * MiB, fsync=fsync)
    small, large = make_entry("small.png", b"s" * 1000), make_entry("large.png", os.urandom(200 * 1024))
    await storage.put(small)
    await storage.put(large)
    assert bool(flushed) is fsync, f"{len(flushed)} flushes with fsync={fsync}"
    for stored in (small, large):
        got = await storage.get(stored.key)
        assert got is not None and read_body(got) == read_body(stored)


async def test_the_readiness_probe_always_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = DiskStorage(tmp_path / "cache", 64 * MiB, fsync=False)
    flushed: list[int] = []
    monkeypatch.setattr(os, "fsync", flushed.append)
    assert await storage.probe()
    assert flushed, "a folder whose flushes fail must not be reported as taking writes"


async def test_a_large_body_comes_back_as_its_checked_open_file(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path / "cache", 64 * MiB)
    large = make_entry("large.png", os.urandom(200 * 1024))
    await storage.put(large)
    got = await storage.get(large.key)
    assert got is not None and isinstance(got.body, BodyFile) and got.body.opened is not None
    body_file(tmp_path / "cache", large).unlink()  # replaced or evicted after the check: the open file still reads
    assert got.body.opened.read(0, got.body.length) == read_body(large)


# -- reads on the event loop -----------------------------------------------------------------------------------------


def count_thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    import anyio.to_thread

    hops: list[object] = []
    real = anyio.to_thread.run_sync

    async def counted(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(function)
        return await real(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    return hops


@pytest.mark.parametrize("size", [1000, 40 * 1024, 200 * 1024])  # embedded, own file read whole, own file opened
async def test_a_warm_hit_is_read_on_the_loop_without_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    storage = DiskStorage(tmp_path / "cache", 64 * MiB, inline_bytes=SMALL_INLINE, embed_bytes=4096)
    stored = make_entry("a.png", os.urandom(size))
    await storage.put(stored)
    assert (await storage.get(stored.key)) is not None  # the first read checks the body's hash
    hops = count_thread_hops(monkeypatch)
    got = await storage.get(stored.key)
    assert got is not None and read_body(got) == read_body(stored)
    assert hops == [], "page-cached files need no thread"


@pytest.mark.parametrize(
    "failure", [BlockingIOError(errno.EAGAIN, "not cached"), OSError(errno.EOPNOTSUPP, "no RWF_NOWAIT here")]
)
async def test_bytes_not_in_the_page_cache_are_read_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError
) -> None:
    storage = DiskStorage(tmp_path / "cache", 64 * MiB)
    stored = make_entry("a.png", b"x" * 5000)
    await storage.put(stored)

    def uncached(*args: Any) -> int:
        raise failure

    monkeypatch.setattr(os, "preadv", uncached)
    hops = count_thread_hops(monkeypatch)
    got = await storage.get(stored.key)
    assert got is not None and read_body(got) == read_body(stored)
    assert len(hops) == 1
    # A filesystem without the flag is not asked again; one that merely lacked the bytes is.
    assert storage._read_on_loop is isinstance(failure, BlockingIOError)


async def test_a_damaged_entry_found_on_the_loop_is_removed_by_the_thread(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path / "cache", 64 * MiB)
    stored = make_entry("a.png", b"x" * 5000)
    await storage.put(stored)
    flip(meta_file(tmp_path / "cache", stored), 40)
    assert await storage.get(stored.key) is None
    assert not meta_file(tmp_path / "cache", stored).exists()
