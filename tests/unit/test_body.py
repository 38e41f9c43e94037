"""moxy.body: the offload threshold, hashing (in memory and from a file), the file-backed body, and the spool with
its fallback to memory when the spool folder takes no writes. Disk faults on a real full folder are driven in
tests/integration/test_disk_faults.py."""

from __future__ import annotations

import gc
import hashlib
import os
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from moxy.body import (
    MEMORY_BODY_BYTES,
    OFFLOAD_BYTES,
    SPOOL_WRITE_BYTES,
    OpenBody,
    Spool,
    digest_bytes,
    digest_file,
    offload,
)
from moxy.errors import UpstreamError

pytestmark = pytest.mark.anyio

KiB = 1024
MiB = 1024 * KiB


def data(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


# -- offload and hashing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "inline"), [(0, True), (OFFLOAD_BYTES - 1, True), (OFFLOAD_BYTES, False)])
async def test_offload_leaves_the_loop_from_the_threshold_on(size: int, inline: bool) -> None:
    loop_thread = threading.get_ident()
    ran_on = await offload(size, threading.get_ident)
    assert (ran_on == loop_thread) is inline


@pytest.mark.parametrize("size", [0, 10, OFFLOAD_BYTES - 1, OFFLOAD_BYTES, 3 * MiB + 7])
async def test_digest_bytes(size: int) -> None:
    body = data(size)
    assert await digest_bytes(body) == hashlib.sha256(body).hexdigest()


def open_body(tmp_path: Path, content: bytes, offset: int = 0, length: int | None = None) -> OpenBody:
    path = tmp_path / "body"
    path.write_bytes(content)
    return OpenBody.open(str(path), offset, len(content) - offset if length is None else length)


@pytest.mark.parametrize("size", [0, 100, MiB, 2 * MiB + 3])
@pytest.mark.parametrize("sample_size", [None, 0, 64 * KiB, 4 * MiB])
async def test_digest_file_hashes_all_and_samples_the_head(tmp_path: Path, size: int, sample_size: int | None) -> None:
    content = data(size)
    sample, digest = await digest_file(open_body(tmp_path, content), sample_size)
    assert digest == hashlib.sha256(content).hexdigest()
    assert sample == (content if sample_size is None else content[:sample_size])


async def test_digest_file_covers_only_its_slice(tmp_path: Path) -> None:
    content = data(10_000)
    sample, digest = await digest_file(open_body(tmp_path, content, offset=1_000, length=5_000), None)
    assert sample == content[1_000:6_000]
    assert digest == hashlib.sha256(content[1_000:6_000]).hexdigest()


# -- the file-backed body --------------------------------------------------------------------------------------


def test_open_body_reads_within_its_slice(tmp_path: Path) -> None:
    content = data(1_000)
    body = open_body(tmp_path, content, offset=100, length=500)
    assert body.read(0, 10) == content[100:110]
    assert body.read(490, 100) == content[590:600]  # clipped at the end of the slice
    assert body.read(500, 10) == b""
    assert body.read(0, 0) == b""


def test_open_body_outlives_its_file_and_closes_when_dropped(tmp_path: Path) -> None:
    content = data(1_000)
    body = open_body(tmp_path, content)
    fd = body.fd
    (tmp_path / "body").unlink()  # a spooled body is unlinked while answers still read it
    assert body.read(0, 1_000) == content
    del body
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


# -- the spool -------------------------------------------------------------------------------------------------


async def feed(spool: Spool, content: bytes, piece: int = 64 * KiB) -> None:
    for start in range(0, len(content), piece):
        await spool.add(content[start : start + piece])


@pytest.mark.parametrize(
    ("size", "spooled"), [(0, False), (4_000, False), (4_001, True), (3 * SPOOL_WRITE_BYTES, True)]
)
async def test_spool_keeps_small_bodies_in_memory(tmp_path: Path, size: int, spooled: bool) -> None:
    content = data(size)
    spool = Spool(tmp_path, 4_000)
    await feed(spool, content, 700)
    body, path = await spool.finish()
    assert spool.length == size
    if spooled:
        assert body is None and path is not None
        assert Path(path).parent == tmp_path and Path(path).read_bytes() == content
    else:
        assert (body, path) == (content, None)
        assert list(tmp_path.iterdir()) == []


def test_memory_bound_defaults() -> None:
    # The in-memory bound sits between the offload threshold and the disk-fault fallback.
    assert OFFLOAD_BYTES < MEMORY_BODY_BYTES < Spool.FALLBACK_BYTES


async def test_discard_removes_the_spool_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1_000)
    await feed(spool, data(3 * SPOOL_WRITE_BYTES))
    assert len(list(tmp_path.iterdir())) == 1
    await spool.discard()
    assert list(tmp_path.iterdir()) == []
    await spool.discard()  # idempotent


async def test_spool_folder_gone_falls_back_to_memory(tmp_path: Path) -> None:
    failures: list[OSError] = []
    spool = Spool(tmp_path / "missing", 1_000, failures.append)
    content = data(2 * MiB)
    await feed(spool, content)
    assert (await spool.finish()) == (content, None)
    assert len(failures) == 1 and isinstance(spool.spool_error, OSError)


async def test_failed_write_brings_the_written_part_back(tmp_path: Path) -> None:
    # The write fails after part of the batch reached the file: nothing is lost, nothing is doubled.
    real = Spool._write_all
    calls = 0

    def fails_half_way(self: Spool, file: Any, chunk: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            real(self, file, chunk[: len(chunk) // 3])
            raise OSError(28, "No space left on device")
        real(self, file, chunk)

    failures: list[OSError] = []
    spool = Spool(tmp_path, 1_000, failures.append)
    content = data(5 * MiB)
    with mock.patch.object(Spool, "_write_all", fails_half_way):
        await feed(spool, content)
        assert (await spool.finish()) == (content, None)
    assert len(failures) == 1
    assert list(tmp_path.iterdir()) == []


async def test_past_the_fallback_bound_the_body_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "missing", 1_000)
    with pytest.raises(UpstreamError) as refused:
        await feed(spool, data(Spool.FALLBACK_BYTES + MiB), MiB)
    assert refused.value.reason == "spool-failed"
    await spool.discard()
