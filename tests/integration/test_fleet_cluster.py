"""Redis Cluster (MOXY_REDIS_CLUSTER=true) against three real cluster nodes on loopback: entries whose two keys
share a slot (hash tags), the locks and the purge stream through the cluster client, and two Moxy hosts sharing
through the cluster."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from moxy.cache.entry import Entry
from moxy.cache.fleet import FleetLocks, Lead
from moxy.cache.purges import PurgeRecord
from moxy.cache.redis import RedisFleet, RedisLink, RedisStorage
from tests.entries import make_entry
from tests.integration.fleet import PNG_HEAD, purge, wait_for
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.integration.redis_servers import RedisClusterNodes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture
async def link(cluster: RedisClusterNodes) -> AsyncIterator[RedisLink]:
    made = RedisLink(cluster.url, cluster=True, timeout=1.0)
    yield made
    await made.aclose()


@pytest.mark.anyio
async def test_the_tier_locks_and_stream_work_through_the_cluster(link: RedisLink) -> None:
    storage, fleet = RedisStorage(link, prefix="c:"), RedisFleet(link, prefix="c:")
    entries = [
        make_entry(f"https://img.example/{n}.png", os.urandom(2000), stored_at=time.time(), lifetime=600.0)
        for n in range(20)  # spread over the nodes' slots
    ]
    for entry in entries:
        await storage.put(entry)
    for entry in entries:
        assert await storage.get(entry.key) == entry
    await storage.touch(entries[0])
    assert await storage.delete(entries[1].key) is True
    assert await storage.get(entries[1].key) is None
    assert await storage.ping() is True

    async def stored() -> Entry | None:
        return await storage.get("https://img.example/new.png")

    locks = FleetLocks(fleet)
    lead = await locks.claim("https://img.example/new.png", stored)
    assert isinstance(lead, Lead)
    assert await fleet.held(lead.name) is True
    await locks.release(lead)
    assert await fleet.held(lead.name) is False

    stream_id = await fleet.publish(PurgeRecord("https://img.example/0.png", 1.5, "p"))
    assert stream_id is not None and await fleet.tip() == stream_id
    assert await fleet.read("0-0", 0.1) == [(stream_id, PurgeRecord("https://img.example/0.png", 1.5, "p"))]
    assert link.errors == 0
    await fleet.aclose()


def test_two_hosts_share_through_the_cluster(
    origin: Origin, start_moxy: Callable[..., MoxyServer], cluster: RedisClusterNodes, tmp_path: Path
) -> None:
    origin.route("/c.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG_HEAD))
    settings = {"redis_url": cluster.url, "redis_cluster": "true", "purge_token": "fleet-purge-token-0123456789abcdef"}
    for name in "ab":
        (tmp_path / name).mkdir()
    a, b = (start_moxy(tmp_path / name / "cache", **settings) for name in "ab")
    url = origin.url("/c.png")
    assert a.get(url).headers["x-moxy-cache"] == "MISS"
    assert b.get(url).headers["x-moxy-cache"] == "HIT", "from the cluster"
    assert origin.hits("/c.png") == 1
    assert purge(a, url).status_code == 200
    wait_for(lambda: b"/c.png" in (b.cache_dir / "purges.log").read_bytes(), 1.0)
