"""Secondary cache keys (RFC 9111 §4.1): which request headers make a variant, and in what form (pure, stdlib only).

An upstream URL has one entry for every client unless the upstream's answer carries `Vary`; then the entry depends
on the forwarded headers that Vary names (vary_names), keyed by their normalised values (variant). A header Moxy
never forwards needs no key: the upstream never saw it, so its answer cannot depend on it.

A forwarded header is part of the cache key and goes upstream, so its value space is the number of variants a
client can make Moxy fetch and keep. `Accept` is reduced to a few classes first: a thousand browser strings ask
for the same image in the same handful of formats, and an unbounded value space would let one client multiply
upstream fetches and cache entries at will."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = [
    "ACCEPT_CLASSES",
    "ANY_HEADER",
    "AVIF",
    "AVIF_WEBP",
    "JSON",
    "WEBP",
    "accept_class",
    "normalise",
    "variant",
    "vary_header",
    "vary_names",
]

# RFC 9110 §5.6.2 token: what a field name is made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
ANY = "*/*"
# The classes, as they are sent upstream and keyed. Order matters: the first that fits wins.
AVIF_WEBP = "image/avif,image/webp,*/*"
AVIF = "image/avif,*/*"
WEBP = "image/webp,*/*"
JSON = "application/json,*/*"
ACCEPT_CLASSES: tuple[str, ...] = (AVIF_WEBP, AVIF, WEBP, JSON, ANY)


def _accepted(value: str) -> set[str]:
    """The media ranges `value` accepts (RFC 9110 §12.5.1), lowercased, without those weighted q=0."""
    accepted: set[str] = set()
    for element in value.split(","):
        media, *parameters = element.split(";")
        media = media.strip(" \t").lower()
        if not media:
            continue
        refused = False
        for parameter in parameters:
            name, _, weight = parameter.partition("=")
            if name.strip(" \t").lower() == "q":
                try:
                    refused = float(weight.strip(" \t")) <= 0
                except ValueError:
                    refused = False
        if not refused:
            accepted.add(media)
    return accepted


def accept_class(value: str) -> str:
    """The class of an Accept value: which of the formats an upstream may choose between the client takes."""
    accepted = _accepted(value)
    avif, webp = "image/avif" in accepted, "image/webp" in accepted
    if avif and webp:
        return AVIF_WEBP
    if avif:
        return AVIF
    if webp:
        return WEBP
    if "application/json" in accepted and not any(media.startswith("image/") for media in accepted):
        return JSON
    return ANY


def normalise(name: str, value: str) -> str:
    """The form of a forwarded header's value that is sent upstream and keyed: whitespace runs made one space,
    and Accept reduced to its class."""
    value = " ".join(value.split())
    if name == "accept" and value:
        return accept_class(value)
    return value


# The `vary` of an answer that varies on everything (`Vary: *`, or a Vary that cannot be read): never stored, never
# shared with another request, and sent on as `Vary: *`.
ANY_HEADER: tuple[str, ...] = ("*",)


def vary_names(vary: str, forwarded: Iterable[str]) -> tuple[str, ...] | None:
    """The forwarded header names (lowercase, sorted) an answer carrying `Vary: vary` depends on; None for
    `Vary: *`, which no stored copy can satisfy (RFC 9111 §4.1), so such an answer is not stored."""
    named = {name.strip(" \t").lower() for name in vary.split(",")}
    named.discard("")
    # A name that is no field name (RFC 9110 §5.1) cannot be matched to anything the client sent: the answer might
    # depend on it, so it is read as `*`, never as one copy for every client.
    if "*" in named or not all(_TOKEN.fullmatch(name) for name in named):
        return None
    return tuple(sorted(named.intersection(name.lower() for name in forwarded)))


def variant(names: Iterable[str], forwarded: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The secondary key of a request: each name's normalised forwarded value, "" when the request had none
    (an absent header is a variant of its own, as the upstream answers it differently too)."""
    return tuple((name, forwarded.get(name, "")) for name in names)


def vary_header(names: Iterable[str]) -> str:
    """`Vary` as Moxy sends it: the headers an entry depends on, in their usual spelling."""
    return ", ".join("-".join(part.capitalize() for part in name.split("-")) for name in names)
