"""`{% load moxy %}`: the `moxy` filter and the `moxy` / `moxy_url` tags.

    <img src="{{ url|moxy }}">  <img src="{{ url|moxy:3600 }}">
    <img src="{% moxy url %}">  <img src="{% moxy url expires=3600 %}">  {% moxy url expires=60 exact=True as src %}

`moxy_url` is the same tag under the name the Jinja2 global has. An expiry is rounded up to a shared bucket as in
Signer.sign (`exact=True`: to the second). A value that cannot be signed raises UnsignableURL naming it, as the Jinja2
filter does: a page with a silently broken picture is worse than an error the developer sees."""

from __future__ import annotations

import html
import math
import reprlib

from django import template  # type: ignore[import-untyped]
from django.utils.safestring import SafeData  # type: ignore[import-untyped]

from moxy.django import get_signer
from moxy.errors import UnsignableURL

register = template.Library()

_shorten = reprlib.Repr()
_shorten.maxstring = 160  # enough to recognise a URL in an error message without dumping a whole data: URI


def _seconds(expires: object) -> float | None:
    # The filter's argument may come quoted (`url|moxy:"3600"`); a bool is a template bug, not one second.
    if expires is None or expires == "":
        return None
    if isinstance(expires, str) and expires.strip().isdigit():
        expires = int(expires)
    if (
        isinstance(expires, bool)
        or not isinstance(expires, int | float)
        or not (expires > 0 and math.isfinite(expires))
    ):
        raise ValueError(f"moxy: expires must be a positive number of seconds, got {_shorten.repr(expires)}")
    return expires


def sign(value: object, expires: object = None, exact: bool = False) -> str:
    """The signed Moxy URL for `value`, a URL string; with `expires` (seconds) valid at least that long."""
    seconds = _seconds(expires)
    if isinstance(value, SafeData):
        url = html.unescape(str(value))  # marked-safe HTML text: the URL is what that HTML reads as (`&amp;` is `&`)
    elif isinstance(value, str):
        url = str(value)
    else:
        raise UnsignableURL(f"moxy: cannot sign {_shorten.repr(value)} in a template: expected a URL string")
    try:
        return get_signer().sign(url, expires_in=seconds, exact=bool(exact))
    except UnsignableURL as exc:
        raise UnsignableURL(f"moxy: cannot sign {_shorten.repr(value)} in a template: {exc}") from exc


def sign_filter(value: object, expires: object = None) -> str:
    return sign(value, expires)


# Registered by call, not as decorators: Django is untyped, and a decorator would erase these functions' types.
register.filter("moxy", sign_filter)
register.simple_tag(sign, name="moxy")
register.simple_tag(sign, name="moxy_url")
