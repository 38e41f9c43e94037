"""Moxy: an HMAC-signed caching URL proxy.

The public API is what a web app needs to sign URLs; it loads no web framework or HTTP client.
The server lives in `moxy.app` (`create_app`) and the template helper in `moxy.templating`."""

from __future__ import annotations

from moxy.errors import (
    BadSignature as BadSignature,
    ConfigError as ConfigError,
    DestinationRefused as DestinationRefused,
    ExpiredURL as ExpiredURL,
    MalformedURL as MalformedURL,
    MoxyError as MoxyError,
    UnsignableURL as UnsignableURL,
    UpstreamError as UpstreamError,
    UpstreamTimeout as UpstreamTimeout,
    VerificationError as VerificationError,
)
from moxy.signing import Signer as Signer, sign_url as sign_url

__version__ = "0.1.0"

__all__ = [
    "BadSignature",
    "ConfigError",
    "DestinationRefused",
    "ExpiredURL",
    "MalformedURL",
    "MoxyError",
    "Signer",
    "UnsignableURL",
    "UpstreamError",
    "UpstreamTimeout",
    "VerificationError",
    "__version__",
    "sign_url",
]
