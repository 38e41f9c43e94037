"""Jinja2 helpers: the `moxy` filter and the `moxy_url` global, which turn upstream URLs into signed Moxy URLs.

The only module that imports jinja2 (an optional extra); it imports nothing from the web shell."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable

try:
    import jinja2
    import markupsafe
except ImportError as exc:  # the hishel pattern: name the extra that brings the missing package
    raise ImportError(
        "moxy.templating needs Jinja2, an optional extra of Moxy: pip install 'moxy-proxy[jinja2]'", name=exc.name
    ) from exc

from moxy.errors import UnsignableURL
from moxy.signing import Signer

__all__ = ["OnError", "setup_jinja2"]

OnError = Callable[[object, UnsignableURL], str]
"""What a template shows instead of a URL it cannot sign: called with the value and the error."""

_shorten = reprlib.Repr()
_shorten.maxstring = 160  # enough to recognise a URL in an error message without dumping a whole data: URI


def _describe(value: object) -> str:
    return _shorten.repr(value)


def _check_expires(expires: object) -> float | None:
    # A bool is an int to Python, but `moxy(expires=true)` is a template bug, not "one second".
    if expires is None:
        return None
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise TypeError(f"moxy: expires must be a number of seconds, got {_describe(expires)}")
    if not (expires > 0 and math.isfinite(expires)):  # also refuses NaN, and infinity (no expiry fits it)
        raise ValueError(f"moxy: expires must be a positive number of seconds, got {expires!r}")
    return expires


def _url_text(value: object) -> str:
    """The URL a template value stands for, or UnsignableURL if it is no URL at all."""
    if isinstance(value, jinja2.Undefined):
        # An undefined name is a bug in the template (a typo, a missing context key), never a data problem,
        # so it fails like any other use of an undefined value and is not handed to `on_error`.
        # `_undefined_message` is jinja2's own wording ("'pic' is undefined"), the same its other errors use.
        raise jinja2.UndefinedError(f"moxy: cannot sign an undefined value: {value._undefined_message}")
    if isinstance(value, markupsafe.Markup):
        # Markup holds HTML text; the URL it stands for is what that HTML reads as (`&amp;` is `&`).
        return str(value.unescape())
    if isinstance(value, str):
        return str(value)  # a plain str, so subclasses cannot change what gets signed
    if value is None:
        raise UnsignableURL("the template gave None instead of a URL")
    raise UnsignableURL(f"expected a URL string, got {type(value).__name__} {_describe(value)}")


def _make_signing_function(signer: Signer, on_error: OnError | None) -> Callable[..., str]:
    def moxy(value: object, expires: float | None = None, exact: bool = False) -> str:
        """The signed Moxy URL for `value`; with `expires` (seconds) it stays valid at least that long after
        rendering, its expiry rounded up to a bucket so pages rendered meanwhile share one cacheable URL
        (`exact=True`: expires exactly `expires` seconds after rendering)."""
        seconds = _check_expires(expires)
        try:
            url = _url_text(value)
            return signer.sign(url, expires_in=seconds, exact=bool(exact))
        except UnsignableURL as exc:
            if on_error is not None:
                return on_error(value, exc)
            raise UnsignableURL(f"moxy: cannot sign {_describe(value)} in a template: {exc}") from exc

    return moxy


def setup_jinja2(
    env: jinja2.Environment,
    signer: Signer | None = None,
    *,
    on_error: OnError | None = None,
) -> None:
    """Add the `moxy` filter and the `moxy_url` global to `env`.

    `{{ url | moxy }}`, `{{ url | moxy(expires=3600) }}`, `{{ moxy_url(url) }}`, `{{ moxy_url(url, expires=60) }}`,
    `{{ url | moxy(expires=3600, exact=true) }}` (see Signer.sign for the rounding of expiries).
    Without `signer`, one is built from the MOXY_* settings now (`Signer.from_env()`), so a missing or short
    key stops the application at start-up with ConfigError rather than on the first page view.

    A value that cannot be signed (None, not a string, not an absolute http(s) URL, whitespace or control
    characters) raises UnsignableURL naming the value when the template is rendered: a page with a silently
    broken image is worse than an error the developer sees. Pass `on_error(value, error) -> str` to show
    something else instead, for example a placeholder image for user-supplied URLs. An undefined variable
    always raises jinja2.UndefinedError, whatever `on_error` says.

    The result is a plain `str`, not Markup: under autoescaping it is escaped like any other text, which leaves
    a signed URL unchanged (base64url, digits, `/`, `?e=`) and keeps an odd configured base URL safe too."""
    sign = _make_signing_function(signer if signer is not None else Signer.from_env(), on_error)
    env.filters["moxy"] = sign
    env.globals["moxy_url"] = sign
