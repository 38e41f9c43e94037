"""The shared purge log: what one process writes, another reads back, and which entries it covers."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

import moxy.cache.purges
from moxy.cache.entry import Entry
from moxy.cache.memory import MemoryStorage
from moxy.cache.purges import PurgeLog
from moxy.cache.tiered import TieredStorage
from tests.entries import make_entry
from tests.fakes.fleet import FakeChannel

pytestmark = pytest.mark.anyio

URL = "https://images.example/cat.png"


def entry(url: str = URL, stored_at: float = 100.0, accept: str | None = None) -> Entry:
    return make_entry(url, accept=accept, stored_at=stored_at)


async def test_nothing_purged_covers_nothing(tmp_path: Path) -> None:
    log = PurgeLog(tmp_path / "purges.log")
    await log.refresh()  # no file yet: not an error
    assert not log.covers(entry())


async def test_purge_covers_every_variant_stored_before_it(tmp_path: Path) -> None:
    log = PurgeLog(tmp_path / "purges.log")
    await log.record(URL, 200.0)
    assert log.covers(entry(stored_at=150.0))
    assert log.covers(entry(stored_at=150.0, accept="image/webp"))
    assert log.covers(entry(stored_at=200.0))
    assert not log.covers(entry(stored_at=200.5)), "fetched after the purge: the new copy stays"
    assert not log.covers(entry(url=URL + "?v=2", stored_at=150.0)), "another URL is untouched"


async def test_another_process_sees_the_purge(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "purges.log"
    writer, reader = PurgeLog(path), PurgeLog(path)
    await writer.record(URL, 200.0)
    assert not reader.covers(entry(stored_at=150.0)), "not read yet"
    await reader.refresh()
    assert reader.covers(entry(stored_at=150.0))
    await writer.record("https://other.example/a.json", 300.0)
    await reader.refresh()
    assert reader.covers(entry(url="https://other.example/a.json", stored_at=250.0))


async def test_a_restart_reads_the_whole_log(tmp_path: Path) -> None:
    path = tmp_path / "purges.log"
    await PurgeLog(path).record(URL, 200.0)
    restarted = PurgeLog(path)
    await restarted.refresh()
    assert restarted.covers(entry(stored_at=199.0))


async def test_the_latest_purge_wins_and_an_older_line_does_not_undo_it(tmp_path: Path) -> None:
    path = tmp_path / "purges.log"
    log = PurgeLog(path)
    await log.record(URL, 300.0)
    await log.record(URL, 200.0)  # written late by a slow process: must not shrink the purge
    reader = PurgeLog(path)
    await reader.refresh()
    for view in (log, reader):
        assert view.covers(entry(stored_at=250.0))


async def test_partial_and_damaged_lines(tmp_path: Path) -> None:
    path = tmp_path / "purges.log"
    reader = PurgeLog(path)
    path.write_bytes(b'not json\n{"t": 1}\n{"url": 5, "t": 1}\n{"t": 200.0, "url": "' + URL.encode())
    await reader.refresh()
    assert not reader.covers(entry(stored_at=150.0)), "a line without its newline is still being written"
    with path.open("ab") as log:
        log.write(b'"}\n')
    await reader.refresh()
    assert reader.covers(entry(stored_at=150.0)), "completed later, read then"


async def test_unchanged_log_is_not_reread(tmp_path: Path) -> None:
    path = tmp_path / "purges.log"
    log = PurgeLog(path)
    await log.record(URL, 200.0)
    reader = PurgeLog(path)
    await reader.refresh()
    path.write_bytes(path.read_bytes().replace(b"200.0", b"900.0"))  # same size: a stat says nothing changed
    await reader.refresh()
    assert not reader.covers(replace(entry(), stored_at=500.0))


async def test_a_log_replaced_by_a_shorter_one_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "purges.log"
    reader = PurgeLog(path)
    await PurgeLog(path).record("https://a.example/long-url-that-makes-the-first-log-long.png", 100.0)
    await reader.refresh()
    path.unlink()
    await PurgeLog(path).record(URL, 200.0)  # shorter than what the reader has already consumed
    await reader.refresh()
    assert reader.covers(entry(stored_at=150.0))


async def test_the_log_is_private(tmp_path: Path) -> None:
    path = tmp_path / "purges.log"
    await PurgeLog(path).record(URL, 1.0)
    assert path.stat().st_mode & 0o077 == 0, "upstream URLs may carry credentials"


async def test_tiers_drop_only_the_copies_older_than_the_purge(tmp_path: Path) -> None:
    """A worker still holding a pre-purge copy in memory must not delete the newer copy another worker stored."""
    log = PurgeLog(tmp_path / "purges.log")
    upper, lower = MemoryStorage(1 << 20, 1 << 20), MemoryStorage(1 << 20, 1 << 20)
    tiers = TieredStorage([upper, lower], log)
    old, new = make_entry(URL, b"old", stored_at=100.0), make_entry(URL, b"new", stored_at=300.0)
    await upper.put(old)
    await lower.put(new)
    await log.record(URL, 200.0)
    got = await tiers.get(old.key)
    assert got is not None and got.body == b"new"
    assert await lower.get(new.key) is new, "the newer copy below stays"
    assert await upper.get(new.key) is new, "and refills the tier above"
    await lower.delete(new.key)
    await upper.put(old)
    assert await tiers.get(old.key) is None, "only pre-purge copies: a miss, and they are gone"
    assert await upper.get(old.key) is None


async def test_an_unwritable_log_still_purges_here(tmp_path: Path) -> None:
    # The cache folder is a file, not a folder: every write to the log fails, as on a full or read-only disk.
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"not a folder")
    log = PurgeLog(blocker / "purges.log")
    assert await log.record(URL, 200.0) is False
    assert log.covers(entry(stored_at=150.0)), "this worker applies the purge whatever the disk does"
    assert await PurgeLog(tmp_path / "purges.log").record(URL, 200.0) is True


async def test_a_purge_is_flushed_to_disk_before_it_counts(tmp_path: Path, flushed: list[int]) -> None:
    # Entries may be written without flushing (MOXY_DISK_FSYNC), but a purge lost to a power cut would bring the
    # purged copies back after the restart: its line is always flushed.
    log = PurgeLog(tmp_path / "purges.log")
    assert await log.record("https://img.example/a.png", 1_700_000_000.0)
    assert flushed


# -- many hosts: the channel ------------------------------------------------------------


def host(tmp_path: Path, name: str, channel: FakeChannel) -> PurgeLog:
    return PurgeLog(tmp_path / name / "purges.log", channel)


def log_lines(log: PurgeLog) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in log.path.read_bytes().splitlines()]


async def test_a_purge_reaches_another_host_with_its_stream_id(tmp_path: Path) -> None:
    channel = FakeChannel()
    a, b = host(tmp_path, "a", channel), host(tmp_path, "b", channel)
    assert await b.pull(channel, 0.0), "first contact: starts at the newest purge, written down as the cursor"
    await a.record(URL, 200.0)
    assert channel.entries[0][1] is not None and channel.entries[0][1].url == URL
    assert await b.pull(channel, 0.0)
    assert b.covers(entry(stored_at=150.0))
    (record,) = [line for line in log_lines(b) if "url" in line]
    assert record["id"] == "1-0" and record["url"] == URL and record["t"] == 200.0
    worker = PurgeLog(b.path)  # another worker of host B reads it from the log
    await worker.refresh()
    assert worker.covers(entry(stored_at=150.0))


async def test_a_hosts_own_purge_is_not_written_twice(tmp_path: Path) -> None:
    channel = FakeChannel()
    path = tmp_path / "a" / "purges.log"
    follower, other_worker = PurgeLog(path, channel), PurgeLog(path, channel)
    assert await follower.pull(channel, 0.0)
    await other_worker.record(URL, 200.0)
    assert await follower.pull(channel, 0.0)
    assert follower.covers(entry(stored_at=150.0))
    assert len([line for line in log_lines(follower) if "url" in line]) == 1, "one line per purge per host"
    restarted = PurgeLog(path, channel)
    assert await restarted.pull(channel, 0.0), "a restart replays from the cursor and skips it again"
    assert len([line for line in log_lines(follower) if "url" in line]) == 1


async def test_a_host_away_during_purges_replays_them_when_back(tmp_path: Path) -> None:
    channel = FakeChannel()
    a, b = host(tmp_path, "a", channel), host(tmp_path, "b", channel)
    assert await b.pull(channel, 0.0)
    channel.down = True
    assert not await b.pull(channel, 0.0)
    channel.down = False
    for n in range(3):
        await a.record(f"{URL}?v={n}", 200.0 + n)  # published while B was not reading
    b_restarted = host(tmp_path, "b", channel)  # even across a restart: the cursor is in the log
    assert await b_restarted.pull(channel, 0.0)
    for n in range(3):
        assert b_restarted.covers(entry(url=f"{URL}?v={n}", stored_at=150.0))


async def test_a_first_follower_starts_at_the_newest_purge(tmp_path: Path) -> None:
    channel = FakeChannel()
    await host(tmp_path, "a", channel).record(URL, 200.0)
    newcomer = host(tmp_path, "new", channel)
    assert await newcomer.pull(channel, 0.0)
    assert not newcomer.covers(entry(stored_at=150.0)), "an empty folder holds no copy an old purge could cover"
    assert log_lines(newcomer) == [{"id": "1-0"}]


async def test_a_damaged_record_is_passed_over(tmp_path: Path) -> None:
    channel = FakeChannel()
    b = host(tmp_path, "b", channel)
    assert await b.pull(channel, 0.0)
    channel.entries.append(("1-0", None))
    await host(tmp_path, "a", channel).record(URL, 200.0)
    assert await b.pull(channel, 0.0)
    assert b.covers(entry(stored_at=150.0))


async def test_a_purge_redis_did_not_take_is_sent_again(tmp_path: Path) -> None:
    channel = FakeChannel()
    channel.down = True
    a = host(tmp_path, "a", channel)
    assert await a.record(URL, 200.0), "logged here all the same"
    assert a.covers(entry(stored_at=150.0))
    channel.down = False
    watcher = asyncio.create_task(a.watch(interval=0.01))
    for _ in range(100):
        if channel.entries:
            break
        await asyncio.sleep(0.01)
    watcher.cancel()
    assert [(i, r.url if r else None) for i, r in channel.entries] == [("1-0", URL)]


async def test_one_follower_per_host(tmp_path: Path) -> None:
    channel = FakeChannel()
    path = tmp_path / "a" / "purges.log"
    first, second = PurgeLog(path, channel), PurgeLog(path, channel)
    assert first._lead() and first._lead()
    assert not second._lead(), "the lock is held by the first worker"
    await first.aclose()
    assert channel.closed
    assert second._lead(), "taken over once the first is gone"
    await second.aclose()


async def test_follow_reconnects_and_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moxy.cache.purges, "BACKOFF_MAX", 0.05)
    channel = FakeChannel()
    b = host(tmp_path, "b", channel)
    channel.down = True
    follower = asyncio.create_task(b.follow(block=0.0))
    await asyncio.sleep(0.2)
    assert channel.reads == 0, "no tip yet: it keeps asking for one, backing off"
    channel.down = False
    for _ in range(200):
        if channel.reads:
            break
        await asyncio.sleep(0.01)
    await host(tmp_path, "a", channel).record(URL, 200.0)
    for _ in range(200):
        if b.covers(entry(stored_at=150.0)):
            break
        await asyncio.sleep(0.01)
    follower.cancel()
    assert b.covers(entry(stored_at=150.0))
    await b.aclose()


async def test_no_channel_no_follower(tmp_path: Path) -> None:
    await PurgeLog(tmp_path / "purges.log").follow()  # returns at once


async def test_a_folder_without_room_for_the_lock_file_does_not_end_the_follower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(moxy.cache.purges, "LEADER_RETRY_SECONDS", 0.01)
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"not a folder")
    follower = asyncio.create_task(PurgeLog(blocker / "purges.log", FakeChannel()).follow())
    await asyncio.sleep(0.05)
    assert not follower.done(), "still trying"
    follower.cancel()
