"""A minimal HTTP/1.1 client that sends what wrk sends (a request line and Host, nothing else).

The checks before a run must see the same cache entry wrk will hit: Moxy keys its cache on the forwarded Accept
header, so a client adding `Accept: */*` (as httpx does) would check a different entry from the one measured."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.servers import BenchError


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def summary(self) -> str:
        return f"{self.status}: {' '.join(self.body.decode('utf-8', 'replace').split())[:160]}"


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise BenchError(f"not a loopback URL with a port: {url}")
    return parts.hostname, parts.port


def request_bytes(url: str) -> bytes:
    """wrk's request for `url`, plus `Connection: close` so that the answer ends where the stream ends."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()


def parse_answer(raw: bytes) -> Answer:
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator:
        raise BenchError(f"no complete answer: {raw[:200]!r}")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    if "content-length" in headers and int(headers["content-length"]) != len(body):
        raise BenchError(f"answer cut short: {len(body)} of {headers['content-length']} bytes")
    return Answer(int(status_line.split()[1]), headers, body)


def get(url: str, timeout: float = 10.0) -> Answer:
    with socket.create_connection(address(url), timeout=timeout) as connection:
        connection.sendall(request_bytes(url))
        chunks = []
        while chunk := connection.recv(1 << 20):
            chunks.append(chunk)
    return parse_answer(b"".join(chunks))


async def get_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: str) -> Answer:
    """The answer to `url` on a connection opened beforehand."""
    writer.write(request_bytes(url))
    await writer.drain()
    raw = await reader.read(-1)
    writer.close()
    return parse_answer(raw)
