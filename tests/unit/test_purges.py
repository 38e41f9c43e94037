"""The shared purge log: what one process writes, another reads back, and which entries it covers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from moxy.cache.entry import Entry
from moxy.cache.purges import PurgeLog
from tests.entries import make_entry

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
