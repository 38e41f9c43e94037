"""Which request headers make a variant, and in what form (pure, stdlib only).

A forwarded header is part of the cache key and goes upstream, so its value space is the number of variants a
client can make Moxy fetch and keep. `Accept` is reduced to a few classes first: a thousand browser strings ask
for the same image in the same handful of formats, and an unbounded value space would let one client multiply
upstream fetches and cache entries at will."""

from __future__ import annotations

__all__ = ["ACCEPT_CLASSES", "AVIF", "AVIF_WEBP", "JSON", "WEBP", "accept_class", "normalise"]

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
