"""Upstream header values outside the RFC 9110 field grammar are dropped on arrival: never stored, never sent, and
never the reason a good copy is lost or an answer comes back empty."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.assets import PNG
from tests.integration import engines
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("upstream_engine")]
upstream_engine = engines.upstream_engine  # once per engine: the module proves the wire

CONTROL_BYTES = [*range(0x01, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]
STORED_FIELDS = [
    "Content-Language",
    "Content-Disposition",
    "Last-Modified",
    "Access-Control-Allow-Origin",
    "Timing-Allow-Origin",
]


def _png(extra: dict[str, str], max_age: int = 60) -> Reply:
    headers = {"Content-Type": "image/png", "Cache-Control": f"max-age={max_age}", **extra}
    return Reply(headers=headers, body=PNG)


@pytest.fixture(scope="module")
def moxy(tmp_path_factory: pytest.TempPathFactory, upstream_engine: str) -> Iterator[MoxyServer]:
    # One Moxy per engine for the tests that need no setting of their own: each test has an origin of its own (a
    # port of its own), so no answer one test stored is ever another's, and no Moxy start is paid per test.
    with MoxyServer(tmp_path_factory.mktemp("hygiene") / "cache", upstream_engine=upstream_engine) as server:
        yield server


def _assert_sendable(response: httpx.Response) -> None:
    for name, value in response.headers.raw:
        assert all(byte in (0x09,) or 0x20 <= byte <= 0x7E or byte >= 0x80 for byte in value), (name, value)


@pytest.mark.parametrize("byte", CONTROL_BYTES, ids=lambda byte: f"0x{byte:02x}")
def test_control_byte_in_a_stored_field_is_dropped_not_fatal(origin: Origin, moxy: MoxyServer, byte: int) -> None:
    # Every stored field carries the byte, in the middle of one value and at the end of another (where a
    # whitespace-stripping reader would hide it).
    poisoned = {
        field: f"x{chr(byte)}y" if position % 2 else f"en{chr(byte)}" for position, field in enumerate(STORED_FIELDS)
    }
    origin.route("/pic.png", _png(poisoned))
    for _ in range(2):  # the miss and the hit both answer in full
        response = moxy.get(origin.url("/pic.png"))
        assert response.status_code == 200
        assert response.content == PNG
        _assert_sendable(response)
        for field in STORED_FIELDS:
            assert field.lower() not in response.headers or field.lower() == "last-modified"
    assert origin.hits("/pic.png") == 1


@pytest.mark.parametrize("content_type", ["image/png\x0b", "image/png\x01", "image/\x7fpng", "\x0cimage/png"])
def test_control_byte_in_content_type_rejects_and_keeps_the_good_copy(
    origin: Origin, start_moxy: Callable[..., MoxyServer], content_type: str
) -> None:
    # TTL_MIN=0 so the good copy is stale when the poisoned answer arrives: it is the answer that would replace it.
    moxy = start_moxy(ttl_min=0)
    origin.route("/pic.png", _png({}, max_age=0))
    first = moxy.get(origin.url("/pic.png"))
    assert first.status_code == 200 and first.content == PNG
    origin.route("/pic.png", Reply(headers={"Content-Type": content_type, "Cache-Control": "max-age=60"}, body=PNG))
    second = moxy.get(origin.url("/pic.png"))
    assert second.status_code == 200
    assert second.content == PNG
    assert second.headers["x-moxy-cache"] == "STALE"
    assert second.headers["content-type"] == "image/png"
    _assert_sendable(second)


def test_control_byte_in_content_type_without_a_good_copy_is_a_clear_502(origin: Origin, moxy: MoxyServer) -> None:
    origin.route("/pic.png", Reply(headers={"Content-Type": "image/png\x0b"}, body=PNG))
    response = moxy.get(origin.url("/pic.png"))
    assert response.status_code == 502
    assert response.json()["error"]
    assert response.headers["x-content-type-options"] == "nosniff"
