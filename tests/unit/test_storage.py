"""One contract suite for every Storage (memory, disk, tiered memory+disk), then the tiered composition itself."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moxy.cache import BodyFile, DiskStorage, Entry, MemoryStorage, Storage, TieredStorage, make_key
from moxy.cache.disk import MiB
from tests.entries import make_entry as entry_of

SMALL = 64 * 1024  # memory's entry cap and disk's inline limit in these tests


@dataclass
class Subject:
    storage: Storage
    keeps_large: bool  # stores bodies over SMALL
    keeps_files: bool  # stores BodyFile bodies
    spool: Path


@pytest.fixture(params=["memory", "disk", "tiered"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    spool = tmp_path / "spool"
    spool.mkdir()
    storage: Storage
    if request.param == "memory":
        storage = MemoryStorage(max_bytes=8 * MiB, max_entry_bytes=SMALL)
        subject = Subject(storage, keeps_large=False, keeps_files=False, spool=spool)
    elif request.param == "disk":
        disk = DiskStorage(tmp_path / "cache", 64 * MiB, inline_bytes=SMALL)
        subject = Subject(disk, keeps_large=True, keeps_files=True, spool=disk.spool_dir)
    else:
        disk = DiskStorage(tmp_path / "cache", 64 * MiB, inline_bytes=SMALL)
        storage = TieredStorage([MemoryStorage(max_bytes=8 * MiB, max_entry_bytes=SMALL), disk])
        subject = Subject(storage, keeps_large=True, keeps_files=True, spool=disk.spool_dir)
    yield subject
    await subject.storage.aclose()


def make_entry(url: str = "https://img.example/a.png", body: bytes = b"\x89PNG small", **overrides: object) -> Entry:
    defaults: dict[str, object] = {
        "stored_at": 1_700_000_000.0,
        "lifetime": 600.0,
        "stale_while_revalidate": 60.0,
        "stale_if_error": 3600.0,
        "etag": '"v1"',
    }
    return entry_of(url, body, accept="image/*", **{**defaults, **overrides})


def body_of(entry: Entry) -> bytes:
    if isinstance(entry.body, bytes):
        return entry.body
    with open(entry.body.path, "rb") as file:
        file.seek(entry.body.offset)
        return file.read(entry.body.length)


def metadata(entry: Entry) -> Entry:
    return entry.with_body(b"")


pytestmark = pytest.mark.anyio


async def test_round_trip(subject: Subject):
    entry = make_entry()
    await subject.storage.put(entry)
    got = await subject.storage.get(entry.key)
    assert got is not None
    assert metadata(got) == metadata(entry)
    assert body_of(got) == entry.body


async def test_miss(subject: Subject):
    assert await subject.storage.get(make_key("https://nowhere/", {})) is None


async def test_key_includes_forwarded_headers(subject: Subject):
    entry = make_entry()
    await subject.storage.put(entry)
    assert await subject.storage.get(make_key(entry.url, {"accept": "image/webp"})) is None


async def test_full_key_compared_when_storage_ids_collide(subject: Subject, monkeypatch: pytest.MonkeyPatch):
    import moxy.cache.disk

    monkeypatch.setattr(moxy.cache.disk, "storage_id", lambda key: "ab" + "0" * 62)
    entry = make_entry("https://a.example/one.png")
    other_key = make_key("https://b.example/two.png", {})
    await subject.storage.put(entry)
    assert await subject.storage.get(other_key) is None
    assert await subject.storage.delete(other_key) is False
    got = await subject.storage.get(entry.key)
    assert got is not None and got.key == entry.key


async def test_delete(subject: Subject):
    entry = make_entry()
    await subject.storage.put(entry)
    assert await subject.storage.delete(entry.key) is True
    assert await subject.storage.get(entry.key) is None
    assert await subject.storage.delete(entry.key) is False


async def test_overwrite(subject: Subject):
    await subject.storage.put(make_entry(body=b"version one"))
    newer = make_entry(body=b"version two, longer", etag='"v2"')
    await subject.storage.put(newer)
    got = await subject.storage.get(newer.key)
    assert got is not None
    assert (got.etag, body_of(got), got.digest) == ('"v2"', b"version two, longer", newer.digest)


@pytest.mark.parametrize("large", [False, True])
async def test_touch_updates_metadata_and_keeps_body(subject: Subject, large: bool):
    body = os.urandom(SMALL * 3 if large else 100)
    entry = make_entry(body=body)
    await subject.storage.put(entry)
    stored = await subject.storage.get(entry.key)
    if large and not subject.keeps_large:
        assert stored is None
        return
    assert stored is not None
    refreshed = stored.refreshed(
        stored_at=1_800_000_000.0,
        age=2.0,
        lifetime=30.0,
        stale_while_revalidate=1.0,
        stale_if_error=2.0,
        must_revalidate=True,
        no_cache=False,
        etag='"v9"',
        last_modified="Sun, 06 Nov 1994 08:49:37 GMT",
    )
    await subject.storage.touch(refreshed)
    got = await subject.storage.get(entry.key)
    assert got is not None
    assert metadata(got) == metadata(refreshed)
    assert body_of(got) == body


async def test_large_body(subject: Subject):
    body = os.urandom(SMALL * 4 + 1)
    entry = make_entry(body=body)
    await subject.storage.put(entry)
    got = await subject.storage.get(entry.key)
    if not subject.keeps_large:
        assert got is None
        return
    assert got is not None
    assert isinstance(got.body, BodyFile)  # above the inline limit: handed over as a file range
    assert body_of(got) == body


async def test_overwrite_large_with_small_and_back(subject: Subject):
    large = make_entry(body=os.urandom(SMALL * 2))
    small = make_entry(body=b"tiny now")
    await subject.storage.put(large)
    await subject.storage.put(small)
    got = await subject.storage.get(small.key)
    assert got is not None and body_of(got) == b"tiny now"
    await subject.storage.put(large)
    got = await subject.storage.get(large.key)
    if subject.keeps_large:
        assert got is not None and body_of(got) == large.body
    else:
        assert got is None  # the small copy must not shadow the newer large one


async def test_put_from_a_spooled_file_leaves_the_source_intact(subject: Subject):
    body = os.urandom(SMALL * 2)
    source = subject.spool / "download.part"
    source.write_bytes(body)
    entry = make_entry(body=body).with_body(BodyFile(str(source), 0, len(body)))
    await subject.storage.put(entry)
    assert source.read_bytes() == body
    source.unlink()  # the fetcher removes its spool afterwards
    got = await subject.storage.get(entry.key)
    if not subject.keeps_files:
        assert got is None
        return
    assert got is not None and body_of(got) == body


async def test_put_from_a_range_of_a_file(subject: Subject):
    body = os.urandom(SMALL * 2)
    source = subject.spool / "with-header.part"
    source.write_bytes(b"HEADER" + body + b"TRAILER")
    entry = make_entry(body=body).with_body(BodyFile(str(source), 6, len(body)))
    await subject.storage.put(entry)
    got = await subject.storage.get(entry.key)
    if subject.keeps_files:
        assert got is not None and body_of(got) == body
    assert source.read_bytes() == b"HEADER" + body + b"TRAILER"


async def test_empty_body(subject: Subject):
    entry = make_entry(body=b"", status=204)
    await subject.storage.put(entry)
    got = await subject.storage.get(entry.key)
    assert got is not None and got.body == b"" and got.status == 204


# -- the tiered composition ------------------------------------------------------------------------------------


class Recorder:
    """A dict-backed tier that logs every call into a shared journal."""

    def __init__(self, name: str, journal: list[str], keep: bool = True) -> None:
        self.name, self.journal, self.keep = name, journal, keep
        self.data: dict[str, Entry] = {}

    async def get(self, key: str) -> Entry | None:
        self.journal.append(f"get {self.name}")
        return self.data.get(key)

    async def put(self, entry: Entry) -> None:
        self.journal.append(f"put {self.name}")
        if self.keep:
            self.data[entry.key] = entry

    async def delete(self, key: str) -> bool:
        self.journal.append(f"delete {self.name}")
        return self.data.pop(key, None) is not None

    async def touch(self, entry: Entry) -> None:
        self.journal.append(f"touch {self.name}")
        self.data[entry.key] = entry

    async def aclose(self) -> None:
        self.journal.append(f"close {self.name}")


async def test_tiered_hit_below_fills_the_tiers_above():
    journal: list[str] = []
    top, middle, bottom = Recorder("top", journal), Recorder("middle", journal), Recorder("bottom", journal)
    entry = make_entry()
    bottom.data[entry.key] = entry
    tiered = TieredStorage([top, middle, bottom])
    assert await tiered.get(entry.key) == entry
    assert journal == ["get top", "get middle", "get bottom", "put top", "put middle"]
    journal.clear()
    assert await tiered.get(entry.key) == entry
    assert journal == ["get top"]


async def test_tiered_writes_top_down_and_deletes_bottom_up():
    journal: list[str] = []
    tiered = TieredStorage([Recorder("top", journal), Recorder("bottom", journal)])
    entry = make_entry()
    await tiered.put(entry)
    await tiered.touch(entry)
    assert await tiered.delete(entry.key) is True
    assert await tiered.delete(entry.key) is False
    await tiered.aclose()
    assert journal == [
        "put top",
        "put bottom",
        "touch top",
        "touch bottom",
        "delete bottom",
        "delete top",
        "delete bottom",
        "delete top",
        "close top",
        "close bottom",
    ]


async def test_tiered_delete_reports_a_copy_in_any_tier():
    journal: list[str] = []
    top, bottom = Recorder("top", journal), Recorder("bottom", journal)
    entry = make_entry()
    top.data[entry.key] = entry
    assert await TieredStorage([top, bottom]).delete(entry.key) is True
    assert entry.key not in top.data


async def test_tiered_memory_is_filled_only_with_small_bodies(tmp_path: Path):
    memory = MemoryStorage(max_bytes=8 * MiB, max_entry_bytes=SMALL)
    disk = DiskStorage(tmp_path, 64 * MiB, inline_bytes=SMALL)
    small, large = make_entry("https://x/s"), make_entry("https://x/l", body=os.urandom(SMALL + 1))
    await disk.put(small)
    await disk.put(large)
    tiered = TieredStorage([memory, disk])
    assert await tiered.get(small.key) is not None
    assert await tiered.get(large.key) is not None
    assert await memory.get(small.key) is not None
    assert await memory.get(large.key) is None
    await tiered.aclose()


def test_tiered_needs_a_tier():
    with pytest.raises(ValueError):
        TieredStorage([])


# -- memory specifics ----------------------------------------------------------------------------------------------


async def test_memory_is_byte_bounded_lru():
    memory = MemoryStorage(max_bytes=3 * (1000 + 700), max_entry_bytes=SMALL)
    entries = [make_entry(f"https://x/{n}", body=bytes([n]) * 1000) for n in range(4)]
    for entry in entries[:3]:
        await memory.put(entry)
    assert await memory.get(entries[0].key) is not None  # used: now the most recent
    await memory.put(entries[3])
    assert await memory.get(entries[1].key) is None  # least recently used went first
    assert all([await memory.get(entries[n].key) is not None for n in (0, 2, 3)])
    assert memory.currsize <= memory.max_bytes


async def test_memory_keeps_stale_entries_reachable():
    memory = MemoryStorage(max_bytes=MiB, max_entry_bytes=SMALL)
    entry = make_entry(lifetime=0.0, stored_at=0.0)
    await memory.put(entry)
    assert await memory.get(entry.key) is entry  # no copy, and no expiry: the stale copy is still there


async def test_tiered_serves_on_when_the_disk_refuses_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The disk is an optimisation: a full disk loses its copy, never the request, and the memory tier keeps its own.
    memory = MemoryStorage(max_bytes=8 * MiB, max_entry_bytes=SMALL)
    disk = DiskStorage(tmp_path, 64 * MiB, inline_bytes=SMALL)
    tiered = TieredStorage([memory, disk])
    small, large = make_entry("https://x/s"), make_entry("https://x/l", body=os.urandom(SMALL + 1))

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    await tiered.put(small)
    await tiered.put(large)
    monkeypatch.undo()
    assert disk.fault == "full"
    assert await tiered.get(small.key) is not None  # from memory
    assert await tiered.get(large.key) is None  # too big for memory, not on disk: the next request refetches
    assert await disk.get(small.key) is None
    assert list((tmp_path / "tmp").iterdir()) == []
    await tiered.put(large)  # space again: written at once, no restart
    assert await disk.get(large.key) is not None
    assert disk.fault is None
    await tiered.aclose()
