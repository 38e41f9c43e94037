"""A scripted `moxy.upstream.Engine`: a handler maps each request to a `Reply` (status, headers, body chunks, an
error after them, or a body that never ends), and every request is recorded. No sockets.

It speaks the engine contract and nothing more. Like the real engine it hands over no body for HEAD, 1xx, 204 and
304, and raises failures as the `UpstreamError` the real engine maps them to (a handler raises it from `send`, a
`Reply.error` from the body). It does not decode content codings: `chunks` are the decoded body the engine would
hand over, so what a coding does on the wire is proven against the real engine (tests/integration)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from moxy.policy import IPAddress

__all__ = ["FakeEngine", "FakeWire", "Handler", "Reply", "Sent"]


@dataclass(slots=True)
class Reply:
    """One answer. `chunks` default to `body` in one piece; `served` counts the chunks the fetcher took."""

    status: int = 200
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = ()
    body: bytes = b""
    chunks: Sequence[bytes] | None = None
    error: BaseException | None = None  # raised by the body after its chunks
    hang: bool = False  # after its chunks, the body waits forever (for timeouts)
    served: int = 0

    def pieces(self) -> list[bytes]:
        if self.chunks is not None:
            return list(self.chunks)
        return [self.body] if self.body else []

    def raw_headers(self) -> list[tuple[str, str]]:
        return list(self.headers.items()) if isinstance(self.headers, Mapping) else list(self.headers)


@dataclass(frozen=True, slots=True)
class Sent:
    """A request as the engine received it."""

    method: str
    url: str
    raw_headers: list[tuple[str, str]]
    pinned: list[IPAddress]

    @property
    def headers(self) -> dict[str, str]:
        """Lowercase names, repeats joined with ", "."""
        joined: dict[str, str] = {}
        for name, value in self.raw_headers:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        return joined

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


Handler = Callable[[Sent], Reply | Awaitable[Reply]]


class FakeWire:
    """The head of `reply` has arrived; its body comes from `chunks()`."""

    def __init__(self, reply: Reply, has_body: bool) -> None:
        self.reply = reply
        self.status = reply.status
        self.raw_headers = reply.raw_headers()
        self.has_body = has_body
        self.aborted = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if not self.has_body:
            return
        for piece in self.reply.pieces():
            if self.aborted:
                return
            self.reply.served += 1
            yield piece
        if self.reply.error is not None:
            raise self.reply.error
        if self.reply.hang:
            await asyncio.Event().wait()

    async def abort(self) -> None:
        self.aborted = True


class FakeEngine:
    """Answers each request with `handler(sent)`; records requests, wires and closes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Sent] = []
        self.wires: list[FakeWire] = []
        self.closed = 0

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], pinned: list[IPAddress]) -> FakeWire:
        sent = Sent(method, url, list(headers), list(pinned))
        self.requests.append(sent)
        result = self.handler(sent)
        reply = await result if inspect.isawaitable(result) else result
        # RFC 9110 §6.4.1: HEAD, 1xx, 204 and 304 answers end with their head.
        has_body = method != "HEAD" and reply.status not in (204, 304) and not 100 <= reply.status < 200
        wire = FakeWire(reply, has_body)
        self.wires.append(wire)
        return wire

    async def aclose(self) -> None:
        self.closed += 1

    @property
    def urls(self) -> list[str]:
        return [sent.url for sent in self.requests]
