"""The Moxy error tree. Errors carry data (a reason, an expiry time), never an HTTP status:
the web shell maps them to statuses in one table, and the CLI reuses them as they are.

    MoxyError
    ├── ConfigError                     .setting
    ├── UnsignableURL (also ValueError)
    ├── VerificationError               .reason
    │   ├── MalformedURL
    │   ├── BadSignature
    │   └── ExpiredURL                  .expired_at
    ├── DestinationRefused              .reason
    └── UpstreamError                   .reason, .status
        └── UpstreamTimeout
"""

from __future__ import annotations

__all__ = [
    "BadSignature",
    "ConfigError",
    "DestinationRefused",
    "ExpiredURL",
    "MalformedURL",
    "MoxyError",
    "UnsignableURL",
    "UpstreamError",
    "UpstreamTimeout",
    "VerificationError",
]


class MoxyError(Exception):
    """Base of every error Moxy raises on purpose."""


class ConfigError(MoxyError):
    """A setting is missing or wrong. `setting` names it as the user writes it (e.g. MOXY_KEY)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class UnsignableURL(MoxyError, ValueError):
    """The signer refuses this URL (not http(s), no host, whitespace or control characters)."""


class VerificationError(MoxyError):
    """A Moxy URL could not be verified."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedURL(VerificationError):
    """The path is not a Moxy URL at all (wrong shape, bad encoding)."""


class BadSignature(VerificationError):
    """The digest does not match the URL under any configured key."""


class ExpiredURL(VerificationError):
    """The signature is good but its expiry time has passed."""

    def __init__(self, reason: str, expired_at: int, url: str | None = None) -> None:
        super().__init__(reason)
        self.expired_at = expired_at
        self.url = url  # what the (good) signature vouches for; never shown to clients


class DestinationRefused(MoxyError):
    """The destination policy forbids connecting to this URL or address."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamError(MoxyError):
    """The upstream failed: no answer, a broken answer, or one that did not pass validation.

    `status` is the upstream's HTTP status when it sent one."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured time."""
