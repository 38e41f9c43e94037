"""Signed URL formats (native and camo-compatible), the key ring, sign and verify.

Pure and stdlib-only: the clock is a constructor argument, nothing here reads the environment."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from moxy.errors import BadSignature, ConfigError, ExpiredURL, MalformedURL, UnsignableURL

__all__ = ["MAX_EXPIRES_AT", "MIN_KEY_BYTES", "Signer", "VerifiedURL", "check_signable", "expiry_bucket", "sign_url"]

MIN_KEY_BYTES = 16
NATIVE_DIGEST_LENGTH = 43  # base64url of 32 bytes, unpadded
CAMO_HEX_DIGEST_LENGTH = 40  # hex of 20 bytes
CAMO_B64_DIGEST_LENGTH = 27  # base64url of 20 bytes, unpadded
# Verification reads at most 12 expiry digits, so the signer must never write more (year 33658 is enough).
MAX_EXPIRES_AT = 10**12 - 1

# Used with fullmatch: "$" would also match before a trailing newline, and bytes.fromhex skips whitespace.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_HEX = re.compile(r"[0-9a-fA-F]*")
_EXPIRY = re.compile(r"0|[1-9][0-9]{0,11}")  # what sign_url writes: str() of 0..MAX_EXPIRES_AT, no leading zeros
# C0 controls, DEL, C1 controls and every Unicode space: none may appear inside a signed URL.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f\s]")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise MalformedURL("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedURL("not base64url") from exc
    # The decoder ignores the spare low bits of the last character (RFC 4648 §3.5), so several spellings
    # decode alike; only the canonical one is accepted, so no changed character in a digest or URL passes.
    if _b64encode(data) != text:
        raise MalformedURL("non-canonical base64url")
    return data


def check_signable(url: str) -> str:
    """Return `url` unchanged if Moxy may sign it, else raise UnsignableURL saying why."""
    if not isinstance(url, str) or not url:
        raise UnsignableURL("empty URL")
    if _FORBIDDEN.search(url):
        raise UnsignableURL("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UnsignableURL(f"not a URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        shown = parts.scheme or "none"
        raise UnsignableURL(f"only absolute http:// and https:// URLs can be signed (scheme: {shown})")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535 or not a number
    except ValueError as exc:
        raise UnsignableURL(f"bad port: {exc}") from exc
    if not host:
        raise UnsignableURL("URL has no host")
    return url


def _signed_url(url_bytes: bytes) -> str:
    """The URL that decoded bytes name, or MalformedURL unless `sign` would have accepted it.

    Verification refuses exactly what signing refuses, and that keeps the signed message unambiguous: an
    expiring URL's message is its URL, a newline and the expiry, so if a verified URL could hold a newline,
    the signature of an expired URL would also vouch for a never-expiring URL spelled that way."""
    try:
        url = url_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedURL("encoded URL is not UTF-8") from exc
    try:
        check_signable(url)
    except UnsignableURL as exc:
        raise MalformedURL(f"encoded URL could not have been signed: {exc}") from exc
    return url


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


@dataclass(frozen=True, slots=True)
class VerifiedURL:
    """What a good signature vouches for."""

    url: str
    expires_at: int | None
    form: str  # "native", "camo-hex-path", "camo-hex-query" or "camo-base64"


# The shortest bucket an expiry is rounded up to: a minute of shared URLs costs a link at most a minute more life.
MIN_EXPIRY_BUCKET = 60


def expiry_bucket(expires_in: float) -> int:
    """The step (seconds) an expiry `expires_in` from now is rounded up to: a tenth of the lifetime, at least a
    minute. A link then lives between `expires_in` and 1.1 x `expires_in` (plus under a minute for short ones)."""
    return max(MIN_EXPIRY_BUCKET, int(expires_in) // 10)


class Signer:
    """Signs upstream URLs into Moxy URLs and verifies them back.

    The first of `keys` signs; every key verifies, so a key can be rotated without breaking
    published URLs. `camo_keys` verify the legacy camo/go-camo forms only and never sign."""

    def __init__(
        self,
        keys: Sequence[str | bytes],
        base_url: str = "http://127.0.0.1:8080",
        *,
        camo_keys: Iterable[str | bytes] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        ring = [_key_bytes(k) for k in keys]
        if not ring:
            raise ConfigError("MOXY_KEY", "no key configured (generate one with `moxy keygen`)")
        for position, key in enumerate(ring, start=1):
            if len(key) < MIN_KEY_BYTES:
                raise ConfigError(
                    "MOXY_KEY", f"key {position} is {len(key)} bytes; at least {MIN_KEY_BYTES} are required"
                )
        self._keys = tuple(ring)
        self._camo_keys = tuple(_key_bytes(k) for k in camo_keys if k)
        self.base_url = base_url.rstrip("/")
        self._base_path = urlsplit(self.base_url).path.rstrip("/")
        self._clock = clock

    def __repr__(self) -> str:
        return f"Signer(keys=<{len(self._keys)} hidden>, base_url={self.base_url!r})"

    @classmethod
    def from_env(cls) -> Signer:
        """A signer built from the MOXY_* settings of the environment."""
        from moxy.config import load_settings

        settings = load_settings()
        return cls(settings.signing_keys(), settings.base_url, camo_keys=settings.camo_keys())

    # -- signing ---------------------------------------------------------------

    def sign(
        self, url: str, expires_in: float | None = None, *, expires_at: int | None = None, exact: bool = False
    ) -> str:
        """The Moxy URL for `url`; with `expires_in` seconds (or an absolute `expires_at`) it expires.

        `expires_in` means "valid for at least that long": the expiry is rounded up to a multiple of
        `expiry_bucket(expires_in)`, so every URL signed for one upstream URL within a bucket is the same string,
        which a CDN or a browser can cache (an expiry that moved every second would make every page a new URL).
        `exact=True` keeps now + `expires_in` to the second."""
        if expires_in is not None:
            if expires_at is not None:
                raise ValueError("give expires_in or expires_at, not both")
            due = self._clock() + expires_in
            if exact or expires_in <= 0:  # a moment already past is no lifetime to round up
                expires_at = int(due)
            else:
                bucket = expiry_bucket(expires_in)
                expires_at = math.ceil(due / bucket) * bucket
        return sign_url(url, self._keys[0], self.base_url, expires_at=expires_at)

    # -- verification ----------------------------------------------------------

    def verify(self, moxy_url: str) -> str:
        """The upstream URL a Moxy URL stands for; raises a VerificationError subclass if it is not good."""
        return self.verify_full(moxy_url).url

    def verify_full(self, moxy_url: str) -> VerifiedURL:
        try:
            parts = urlsplit(moxy_url.strip())
        except ValueError as exc:  # e.g. an unbalanced "[" in the host: not a Moxy URL at all
            raise MalformedURL(f"not a URL: {exc}") from exc
        path = parts.path
        if self._base_path and path.startswith(self._base_path + "/"):
            path = path[len(self._base_path) :]
        return self.verify_path(path, parts.query)

    def verify_path(self, path: str, query: str = "") -> VerifiedURL:
        """Verify the path and query string of a request (what follows the base URL)."""
        # A trailing "/" after the encoded URL is tolerated (some camo URL helpers add one).
        trimmed = path[1:] if path.startswith("/") else path
        trimmed = trimmed[:-1] if trimmed.endswith("/") else trimmed
        segments = trimmed.split("/") if trimmed else []
        params = parse_qs(query, keep_blank_values=True)
        if len(segments) == 1 and "url" in params and self._camo_keys:
            return self._verify_camo_query(segments[0], params["url"])
        if len(segments) != 2:
            raise MalformedURL("expected /{digest}/{encoded-url}")
        digest, encoded = segments
        if len(digest) == NATIVE_DIGEST_LENGTH:
            return self._verify_native(digest, encoded, params)
        if len(digest) == CAMO_HEX_DIGEST_LENGTH and _HEX.fullmatch(digest) and self._camo_keys:
            return self._verify_camo_hex(digest, encoded)
        if len(digest) == CAMO_B64_DIGEST_LENGTH and _B64URL.fullmatch(digest) and self._camo_keys:
            return self._verify_camo_b64(digest, encoded)
        raise MalformedURL("digest has the wrong length")

    def _verify_native(self, digest: str, encoded: str, params: dict[str, list[str]]) -> VerifiedURL:
        # The URL is checked before the digest: it is public, so the order tells nothing about the keys, and a
        # URL that could never have been signed needs no HMAC.
        url = _signed_url(_b64decode(encoded))
        expires_at: int | None = None
        message = url.encode("utf-8")
        if "e" in params:
            raw = params["e"]
            if len(raw) != 1 or not _EXPIRY.fullmatch(raw[0]):
                raise MalformedURL("expiry must be one decimal unix time, as the signer writes it")
            expires_at = int(raw[0])
            message += b"\n" + raw[0].encode("ascii")
        try:
            given = _b64decode(digest)
        except MalformedURL as exc:
            raise MalformedURL("digest is not base64url") from exc
        if not _matches_any(given, message, self._keys, hashlib.sha256):
            raise BadSignature("signature does not match")
        if expires_at is not None and self._clock() >= expires_at:
            raise ExpiredURL(f"URL expired at {expires_at} ({_iso(expires_at)})", expires_at, url)
        return VerifiedURL(url, expires_at, "native")

    def _verify_camo_hex(self, digest: str, encoded: str) -> VerifiedURL:
        if not _HEX.fullmatch(encoded) or len(encoded) % 2:
            raise MalformedURL("camo hex digest needs a hex-encoded URL")
        return self._finish_camo(bytes.fromhex(digest), bytes.fromhex(encoded), "camo-hex-path")

    def _verify_camo_query(self, digest: str, values: list[str]) -> VerifiedURL:
        if len(values) != 1 or len(digest) != CAMO_HEX_DIGEST_LENGTH or not _HEX.fullmatch(digest):
            raise MalformedURL("camo query form needs a hex digest and one url parameter")
        return self._finish_camo(bytes.fromhex(digest), values[0].encode("utf-8"), "camo-hex-query")

    def _verify_camo_b64(self, digest: str, encoded: str) -> VerifiedURL:
        if _HEX.fullmatch(encoded) and len(encoded) % 2 == 0 and len(encoded) >= 2 * 8 and _looks_like_hex_url(encoded):
            raise MalformedURL("base64 digest with a hex-encoded URL")
        return self._finish_camo(_b64decode(digest), _b64decode(encoded), "camo-base64")

    def _finish_camo(self, given: bytes, url_bytes: bytes, form: str) -> VerifiedURL:
        # Camo keys sign the URL alone, so no message is ambiguous here; the URL is still held to what
        # `sign` accepts, so every form vouches only for a destination Moxy itself could have signed.
        url = _signed_url(url_bytes)
        if not _matches_any(given, url_bytes, self._camo_keys, hashlib.sha1):
            raise BadSignature("signature does not match")
        return VerifiedURL(url, None, form)


def _looks_like_hex_url(encoded: str) -> bool:
    try:
        return bytes.fromhex(encoded).lower().startswith((b"http://", b"https://"))
    except ValueError:
        return False


def _matches_any(given: bytes, message: bytes, keys: Sequence[bytes], algorithm: Callable[..., object]) -> bool:
    # Every key is tried even after a match, so timing says nothing about which key matched.
    matched = False
    for key in keys:
        expected = hmac.digest(key, message, algorithm)  # type: ignore[arg-type]  # one-shot, in C
        matched |= hmac.compare_digest(given, expected)
    return matched


def _iso(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def sign_url(url: str, key: str | bytes, base_url: str, *, expires_at: int | None = None) -> str:
    """The native Moxy URL for `url` under `key` (the format README.md "Signing URLs" describes)."""
    check_signable(url)
    key_bytes = _key_bytes(key)
    if len(key_bytes) < MIN_KEY_BYTES:
        raise ConfigError("MOXY_KEY", f"key is {len(key_bytes)} bytes; at least {MIN_KEY_BYTES} are required")
    message = url.encode("utf-8")
    suffix = ""
    if expires_at is not None:
        if not 0 <= expires_at <= MAX_EXPIRES_AT:
            raise ValueError(f"expires_at must be a unix time between 0 and {MAX_EXPIRES_AT}")
        message += b"\n" + str(int(expires_at)).encode("ascii")
        suffix = f"?e={int(expires_at)}"
    digest = _b64encode(hmac.new(key_bytes, message, hashlib.sha256).digest())
    return f"{base_url.rstrip('/')}/{digest}/{_b64encode(url.encode('utf-8'))}{suffix}"
