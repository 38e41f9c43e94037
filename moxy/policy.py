"""Destination policy (the SSRF guard): which URLs, hosts and addresses Moxy may connect to.

Pure and stdlib-only: no sockets and no DNS (the caller resolves a name and hands the answers to
`choose_addresses`), no clock, no environment, no logging. Imports nothing from Moxy but `errors`."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias
from urllib.parse import unquote_to_bytes

from moxy.errors import ConfigError, DestinationRefused

__all__ = [
    "DEFAULT_PORTS",
    "DestinationPolicy",
    "IPAddress",
    "IPNetwork",
    "Target",
    "address_refusal",
    "parse_host",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Refused IPv4 classes, first match wins (so the narrow entries sit above the ranges that contain them).
# Sources: the IANA IPv4 Special-Purpose Address Registry (RFC 6890) and the RFCs cited per line.
_V4_REFUSED: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    # RFC 1122 §3.2.1.3 "this network"; Linux sends a connect() to 0.0.0.0 to the local host.
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("10.0.0.0/8"), "private"),  # RFC 1918
    (_V4("100.64.0.0/10"), "cgnat"),  # RFC 6598 shared address space
    (_V4("127.0.0.0/8"), "loopback"),  # RFC 1122 §3.2.1.3
    # The metadata service of AWS, GCP, Azure and OpenStack: the single most valuable SSRF target.
    (_V4("169.254.169.254/32"), "link-local (cloud metadata)"),
    (_V4("169.254.0.0/16"), "link-local"),  # RFC 3927
    (_V4("172.16.0.0/12"), "private"),  # RFC 1918
    (_V4("192.0.0.0/24"), "special-purpose"),  # RFC 6890 §2.2.2 IETF protocol assignments (DS-Lite, NAT64 discovery)
    (_V4("192.0.2.0/24"), "documentation"),  # RFC 5737 TEST-NET-1
    (_V4("192.88.99.0/24"), "reserved"),  # RFC 7526: the deprecated 6to4 relay anycast prefix
    (_V4("192.168.0.0/16"), "private"),  # RFC 1918
    (_V4("198.18.0.0/15"), "benchmarking"),  # RFC 2544
    (_V4("198.51.100.0/24"), "documentation"),  # RFC 5737 TEST-NET-2
    (_V4("203.0.113.0/24"), "documentation"),  # RFC 5737 TEST-NET-3
    (_V4("233.252.0.0/24"), "documentation"),  # RFC 6676 MCAST-TEST-NET (inside multicast)
    (_V4("224.0.0.0/4"), "multicast"),  # RFC 5771
    (_V4("255.255.255.255/32"), "broadcast"),  # RFC 919 limited broadcast (inside 240/4)
    (_V4("240.0.0.0/4"), "reserved"),  # RFC 1112 §4 former class E
)

# Refused IPv6 classes, first match wins. The embeddings that carry an IPv4 address we can judge
# (mapped, 6to4, NAT64) are handled before this table; the ones listed here are refused outright.
_V6_REFUSED: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),  # RFC 4291 §2.5.2
    (_V6("::1/128"), "loopback"),  # RFC 4291 §2.5.3
    # RFC 4291 §2.5.5.1 deprecated IPv4-compatible addresses: no valid destination uses them any more, and
    # some stacks still route them as IPv4, so they are refused whatever the IPv4 address inside.
    (_V6("::/96"), "ipv4-compatible"),
    # RFC 2765 SIIT IPv4-translated (::ffff:0:a.b.c.d), obsoleted by RFC 6145 and never globally routed.
    (_V6("::ffff:0:0:0/96"), "ipv4-translated"),
    (_V6("100::/64"), "discard-only"),  # RFC 6666
    # RFC 4380 Teredo. Refused outright rather than judged: the packet is relayed over UDP to the obfuscated
    # client IPv4 (behind whatever NAT), public Teredo relays are long gone, and no real origin lives here.
    (_V6("2001::/32"), "teredo"),
    (_V6("2001:2::/48"), "benchmarking"),  # RFC 5180
    (_V6("2001:db8::/32"), "documentation"),  # RFC 3849
    (_V6("2001::/23"), "special-purpose"),  # RFC 2928 IETF protocol assignments (ORCHID, AMT, AS112...)
    (_V6("3fff::/20"), "documentation"),  # RFC 9637
    (_V6("5f00::/16"), "reserved"),  # RFC 9602 SRv6 SIDs
    # The AWS metadata service over IPv6; it is ULA, so it would be refused anyway, but name it.
    (_V6("fd00:ec2::254/128"), "private (cloud metadata)"),
    (_V6("fc00::/7"), "private"),  # RFC 4193 unique local addresses
    (_V6("fe80::/10"), "link-local"),  # RFC 4291 §2.5.6
    (_V6("fec0::/10"), "site-local"),  # RFC 3879 deprecated site-local
    (_V6("ff00::/8"), "multicast"),  # RFC 4291 §2.7
)

_V6_GLOBAL_UNICAST = _V6("2000::/3")  # RFC 4291 §2.4: everything outside it is reserved or special
_V4_MAPPED = _V6("::ffff:0:0/96")  # RFC 4291 §2.5.5.2
_SIX_TO_FOUR = _V6("2002::/16")  # RFC 3056 §2: 2002:AABB:CCDD::/48 carries the IPv4 AA.BB.CC.DD
_NAT64_WELL_KNOWN = _V6("64:ff9b::/96")  # RFC 6052 §2.1: IPv4 in the last 32 bits
_NAT64_LOCAL_USE = _V6("64:ff9b:1::/48")  # RFC 8215: the operator picks a prefix length of 48 or more

# RFC 6052 §2.2: where the 32 IPv4 bits sit for each NAT64 prefix length (bits 64-71, byte 8, are skipped).
# Most common layout first, so a refusal names what the address most likely carries.
_NAT64_LAYOUTS: dict[int, tuple[slice, ...]] = {
    96: (slice(12, 16),),
    64: (slice(9, 13),),
    56: (slice(7, 8), slice(9, 12)),
    48: (slice(6, 8), slice(9, 11)),
}

# How many accepted URLs DestinationPolicy remembers (the hot set of a busy worker fits; the rest is re-checked).
ACCEPTED_MEMO_SIZE = 4096
# Same set the signer refuses: C0 controls, space, DEL, C1 controls and every Unicode space. WHATWG parsers
# silently drop some of these (tab, newline) and others do not, so a URL carrying any is refused.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_PATTERN = re.compile(r"[a-z0-9_\-.*?\[\]!]+")
# UTS 46 deviation characters: IDNA 2003 (the stdlib codec) maps them away, IDNA 2008 (httpx, browsers)
# keeps them, so the two would name different hosts. Refusing them keeps the checked host the fetched one.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")
_HEX_DIGITS = frozenset("0123456789abcdef")
_OCTAL_DIGITS = frozenset("01234567")
_DECIMAL_DIGITS = frozenset("0123456789")
_MAX_HOST_LENGTH = 253  # RFC 1035 §2.3.4, in presentation form without the trailing dot


def address_refusal(address: IPAddress) -> str | None:
    """The class for which `address` is refused ("loopback", "6to4 of private", ...), or None if it is public.

    Ignores allowed networks: that exception belongs to `DestinationPolicy.check_address`."""
    if isinstance(address, ipaddress.IPv4Address):
        for network, label in _V4_REFUSED:
            if address in network:
                return label
        return None
    embedded = _embedded_refusal(address)
    if embedded is not None:
        return embedded or None
    for v6_network, label in _V6_REFUSED:
        if address in v6_network:
            return label
    if address not in _V6_GLOBAL_UNICAST:
        return "reserved"
    return None


def _embedded_refusal(address: ipaddress.IPv6Address) -> str | None:
    """For an IPv6 form that embeds an IPv4 address: the refusal label, or "" when the IPv4 inside is public.

    None when `address` is not such a form."""
    if address in _V4_MAPPED:
        mapped = address.ipv4_mapped
        assert mapped is not None
        label = address_refusal(mapped)
        return "" if label is None else f"ipv4-mapped {label}"
    if address in _SIX_TO_FOUR:
        inner = ipaddress.IPv4Address(address.packed[2:6])
        label = address_refusal(inner)
        return "" if label is None else f"6to4 of {label}"
    if address in _NAT64_WELL_KNOWN:
        label = address_refusal(ipaddress.IPv4Address(address.packed[12:16]))
        return "" if label is None else f"nat64 of {label}"
    if address in _NAT64_LOCAL_USE:
        # The prefix length is a local choice we cannot see, and a network-specific prefix may carry private
        # IPv4 addresses (RFC 6052 §3.1), so every layout RFC 6052 allows for a /48 or longer prefix is judged
        # and the address is refused if any of them decodes to a refused IPv4. A deployment whose prefix has
        # zero bytes (64:ff9b:1::/96) is therefore refused whole; one like 64:ff9b:1:abcd:ef01:2345::/96 works.
        for slices in _NAT64_LAYOUTS.values():
            packed = b"".join(address.packed[part] for part in slices)
            label = address_refusal(ipaddress.IPv4Address(packed))
            if label is not None:
                return f"nat64 of {label}"
        return ""
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a checked URL points: normalised host, port, and the address when the host is an IP literal."""

    scheme: str  # "http" | "https"
    host: str  # lowercased, IDNA-encoded (punycode) name; or canonical text of an IP literal (IPv6 unbracketed)
    port: int  # explicit, or the default for the scheme
    address: IPAddress | None  # set when the URL's host is an IP literal in any spelling, else None

    @property
    def authority(self) -> str:
        """`host[:port]` as a Host header wants it: IPv6 bracketed, default port left out."""
        host = f"[{self.host}]" if isinstance(self.address, ipaddress.IPv6Address) else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Which destinations Moxy may fetch from, checked before every fetch and again on every redirect hop.

    Host patterns are shell globs matched case-insensitively against the normalised host, trailing dot
    ignored. `*` also matches dots, so `*.example.com` matches every subdomain at any depth but not
    `example.com` itself (list both to allow both); a pattern without `*` matches exactly one name. An IP
    literal host is matched by its canonical text (`127.0.0.1`, `::1`). Deny wins over allow; an empty
    allow list allows every host. Patterns are normalised on construction."""

    # Exceptions to the address refusals (the tests use 127.0.0.0/8 and ::1/128).
    allowed_networks: tuple[IPNetwork, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()
    # URLs already checked and accepted: the same URL is checked on every request and every fetch, and the
    # answer depends only on the URL and this (immutable) policy. Refusals are not kept; they are cheap to redo.
    _accepted: dict[str, Target] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "allow_hosts", _normalise_patterns(self.allow_hosts))
        object.__setattr__(self, "deny_hosts", _normalise_patterns(self.deny_hosts))

    @classmethod
    def from_settings_values(
        cls, allowed_networks: Iterable[str], allow_hosts: Iterable[str], deny_hosts: Iterable[str]
    ) -> DestinationPolicy:
        """Build from MOXY_ALLOWED_NETWORKS, MOXY_ALLOW_HOSTS and MOXY_DENY_HOSTS; raises ConfigError naming one."""
        networks: list[IPNetwork] = []
        for cidr in allowed_networks:
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ConfigError("MOXY_ALLOWED_NETWORKS", f"{cidr!r} is not a network in CIDR form") from None
        patterns: dict[str, tuple[str, ...]] = {}
        for setting, values in (("MOXY_ALLOW_HOSTS", allow_hosts), ("MOXY_DENY_HOSTS", deny_hosts)):
            try:
                patterns[setting] = _normalise_patterns(values)
            except ValueError as exc:
                raise ConfigError(setting, str(exc)) from None
        return cls(tuple(networks), patterns["MOXY_ALLOW_HOSTS"], patterns["MOXY_DENY_HOSTS"])

    def check_url(self, url: str) -> Target:
        """Check everything about `url` that needs no DNS and return where it points.

        Refuses (DestinationRefused) other schemes, credentials, port 0, malformed or denied hosts, and an
        IP-literal host (in any spelling a browser accepts) whose address `check_address` refuses. For a
        name, the caller resolves `Target.host` and passes the answers to `choose_addresses`."""
        known = self._accepted.get(url)
        if known is not None:
            return known
        scheme, host_text, port = _split_url(url)
        host, address = parse_host(host_text)
        if any(fnmatch.fnmatchcase(host, pattern) for pattern in self.deny_hosts):
            raise DestinationRefused(f"host {host} is denied")
        if self.allow_hosts and not any(fnmatch.fnmatchcase(host, pattern) for pattern in self.allow_hosts):
            raise DestinationRefused(f"host {host} is not in the allowed hosts")
        if address is not None:
            self.check_address(address)
        target = Target(scheme=scheme, host=host, port=port, address=address)
        if len(self._accepted) >= ACCEPTED_MEMO_SIZE:
            self._accepted.clear()  # crude but bounded; a hot set refills at once
        self._accepted[url] = target
        return target

    def check_address(self, address: str | IPAddress) -> IPAddress:
        """Return the address (parsed) if Moxy may connect to it, else raise DestinationRefused.

        An address is accepted when it is public or inside `allowed_networks`. An IPv4-mapped IPv6 address is
        the same destination as its IPv4 address, so it is also accepted when that IPv4 address is allowed;
        other embeddings (6to4, NAT64) lead elsewhere and only count as allowed when the IPv6 address is."""
        ip = _coerce_address(address)
        label = self._refusal(ip)
        if label is not None:
            raise DestinationRefused(f"{label} address {ip}")
        return ip

    def choose_addresses(self, target: Target, resolved: Sequence[str | IPAddress]) -> list[IPAddress]:
        """The addresses to connect to for `target`, in the resolver's order, duplicates dropped.

        `resolved` is what DNS answered for `target.host`. It is refused whole when it is empty or when any
        address in it is refused: a name that points at an internal address is hostile, and quietly
        picking its public sibling would still hand the attacker a rebinding oracle. For an IP-literal
        target the answer is its own address and `resolved` is ignored. A refusal names the class but not
        the resolved address, so a 403 body never reveals what an internal name resolves to."""
        if target.address is not None:
            return [self.check_address(target.address)]
        if not resolved:
            raise DestinationRefused(f"host {target.host} resolves to no address")
        chosen: list[IPAddress] = []
        for answer in resolved:
            if isinstance(answer, str) and "%" in answer:
                raise DestinationRefused(f"host {target.host} resolves to an address with a zone identifier")
            try:
                ip = _coerce_address(answer)
            except DestinationRefused:
                raise DestinationRefused(f"host {target.host} resolves to something that is not an address") from None
            label = self._refusal(ip)
            if label is not None:
                article = "an" if label[0] in "aeiou" else "a"
                raise DestinationRefused(f"host {target.host} resolves to {article} {label} address")
            if ip not in chosen:
                chosen.append(ip)
        return chosen

    def _refusal(self, ip: IPAddress) -> str | None:
        if self._allowed(ip):
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and self._allowed(ip.ipv4_mapped):
            return None
        return address_refusal(ip)

    def _allowed(self, ip: IPAddress) -> bool:
        # `in` between different IP versions is simply False, so one loop serves both.
        return any(ip in network for network in self.allowed_networks)


def parse_host(text: str) -> tuple[str, IPAddress | None]:
    """Parse a URL's host the way the WHATWG URL Standard (§3.5 host parsing) does for http(s).

    Returns the normalised host and, for an IP literal, its address. Accepts `[IPv6]` (no zone id),
    percent-encoded names, IDNs (to punycode), and every IPv4 spelling browsers accept: decimal `2130706433`,
    octal `0177.0.0.1`, hex `0x7f.0.0.1` / `0x7f000001`, short `127.1`, mixed `0x7f.1`, a trailing dot. A
    host whose last label is numeric but is no valid IPv4 (`256.1.1.1`, `0x100000000`, `example.123`) is
    refused, never handed to DNS. Raises DestinationRefused."""
    if text.startswith("[") or text.endswith("]"):
        return _parse_ipv6_literal(text)
    try:
        decoded = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise DestinationRefused("host is not UTF-8 after percent-decoding") from None
    if _FORBIDDEN.search(decoded):
        raise DestinationRefused("host contains whitespace or control characters")
    host = _to_ascii(decoded).removesuffix(".")
    if not host:
        raise DestinationRefused("URL has no host")
    if len(host) > _MAX_HOST_LENGTH:
        raise DestinationRefused("host name is too long")
    if _ends_in_number(host):
        ipv4 = _parse_ipv4(host)
        return str(ipv4), ipv4
    if not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise DestinationRefused(f"malformed host name {host!r}")
    return host, None


def _split_url(url: str) -> tuple[str, str, int]:
    """Scheme, raw host and port of an absolute http(s) URL; refuses what parsers disagree about."""
    if not isinstance(url, str) or not url:
        raise DestinationRefused("empty URL")
    if _FORBIDDEN.search(url):
        raise DestinationRefused("URL contains whitespace or control characters")
    match = _SCHEME.match(url)
    if match is None:
        raise DestinationRefused("URL has no scheme")
    scheme = match.group()[:-1].lower()
    if scheme not in DEFAULT_PORTS:
        raise DestinationRefused(f"scheme {scheme!r} is not allowed (only http and https)")
    rest = url[match.end() :]
    # WHATWG also reads `http:host`, `http:/host` and `http:\\host` as `http://host`; RFC 3986 parsers do not.
    # Only the one spelling every parser agrees on is accepted.
    if not rest.startswith("//"):
        raise DestinationRefused("URL has no host (expected scheme://host)")
    rest = rest[2:]
    end = min((index for index in map(rest.find, "/?#") if index >= 0), default=len(rest))
    authority = rest[:end]
    # WHATWG ends the authority at a backslash, RFC 3986 does not: `http://a.example\@127.0.0.1/` names a
    # different host to each. Refuse rather than guess which one the fetcher will use.
    if "\\" in authority:
        raise DestinationRefused("backslash in URL authority")
    # Credentials are refused rather than stripped: Moxy must never send them upstream, the URL would be
    # fetched differently from how it reads, and `user@` is a classic way to disguise the real host.
    if "@" in authority:
        raise DestinationRefused("credentials in URL are not allowed")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise DestinationRefused("unterminated IPv6 literal")
        host_text, after = authority[: close + 1], authority[close + 1 :]
        if after and not after.startswith(":"):
            raise DestinationRefused("junk after IPv6 literal")
        port_text = after[1:]
    else:
        host_text, _, port_text = authority.partition(":")
    if not host_text:
        raise DestinationRefused("URL has no host")
    return scheme, host_text, _parse_port(port_text, scheme)


def _parse_port(text: str, scheme: str) -> int:
    if not text:  # WHATWG and RFC 3986 §3.2.3 both read an empty port as the default
        return DEFAULT_PORTS[scheme]
    if not _PORT.fullmatch(text):
        raise DestinationRefused(f"malformed port {text[:12]!r}")
    port = int(text)
    # Any port is allowed: operators serve assets on odd ones. Port 0 is no destination at all.
    if not 1 <= port <= 65535:
        raise DestinationRefused(f"port {port} is out of range (1-65535)")
    return port


def _parse_ipv6_literal(text: str) -> tuple[str, ipaddress.IPv6Address]:
    if not (text.startswith("[") and text.endswith("]")):
        raise DestinationRefused("malformed IPv6 literal")
    inner = text[1:-1]
    # RFC 6874 zone ids pick an interface of this machine: never a remote destination. Checked before parsing
    # because ipaddress accepts `fe80::1%eth0`.
    if "%" in inner:
        raise DestinationRefused("IPv6 zone identifiers are not allowed")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        raise DestinationRefused(f"malformed IPv6 literal {text[:48]!r}") from None
    return str(address), address


def _to_ascii(host: str) -> str:
    """Lowercase ASCII form of a host name: IDNA (RFC 3490, the stdlib codec) for non-ASCII names."""
    if host.isascii():
        return host.lower()
    if _IDNA_DEVIATIONS.intersection(host):
        raise DestinationRefused("host name has characters IDNA 2003 and 2008 encode differently")
    try:
        # The codec's nameprep also maps full-width digits and dots, so `１２７．０．０．１` becomes an IPv4 below,
        # as it does in browsers (UTS 46 mapping).
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise DestinationRefused("host name cannot be IDNA-encoded") from None


def _parse_ipv4_number(part: str) -> int | None:
    """WHATWG "IPv4 number parser": 0x hex, leading-zero octal, else decimal; None when it is not one."""
    if not part:
        return None
    if part.startswith("0x"):
        digits, allowed, radix = part[2:], _HEX_DIGITS, 16
    elif len(part) > 1 and part.startswith("0"):
        digits, allowed, radix = part[1:], _OCTAL_DIGITS, 8
    else:
        digits, allowed, radix = part, _DECIMAL_DIGITS, 10
    if not digits:  # a bare `0x` is zero, as in browsers
        return 0
    # Explicit digit sets, because int() also takes `_` separators and non-ASCII digits.
    if not allowed.issuperset(digits):
        return None
    return int(digits, radix)


def _ends_in_number(host: str) -> bool:
    """WHATWG "ends in a number checker" (trailing dot already removed)."""
    last = host.rpartition(".")[2]
    return bool(last) and (_DECIMAL_DIGITS.issuperset(last) or _parse_ipv4_number(last) is not None)


def _parse_ipv4(host: str) -> ipaddress.IPv4Address:
    """WHATWG IPv4 parser: one to four numbers, the last filling all the remaining bytes."""
    parts = host.split(".")
    numbers = [_parse_ipv4_number(part) for part in parts]
    if len(parts) > 4 or None in numbers:
        raise DestinationRefused(f"malformed IPv4 address {host!r}")
    values = [number for number in numbers if number is not None]
    if any(value > 255 for value in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        raise DestinationRefused(f"malformed IPv4 address {host!r} (a part is out of range)")
    total = values[-1]
    for position, value in enumerate(values[:-1]):
        total += value << (8 * (3 - position))
    return ipaddress.IPv4Address(total)


def _coerce_address(address: str | IPAddress) -> IPAddress:
    """An address from a resolver or a caller: canonical text or an ipaddress object, no zone id."""
    if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return address
    if "%" in address:
        raise DestinationRefused("addresses with an IPv6 zone identifier are not allowed")
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise DestinationRefused(f"not an IP address: {address[:48]!r}") from None


def _normalise_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    normalised = []
    for raw in patterns:
        pattern = raw.strip().lower()
        if pattern:
            normalised.append(_normalise_pattern(pattern))
    return tuple(normalised)


def _normalise_pattern(pattern: str) -> str:
    literal = pattern[1:-1] if pattern.startswith("[") and pattern.endswith("]") else pattern
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    pattern = pattern.removesuffix(".")
    if not pattern.isascii():
        labels = []
        for label in pattern.split("."):
            if label.isascii():
                labels.append(label)
                continue
            if _IDNA_DEVIATIONS.intersection(label) or any(char in label for char in "*?[]!"):
                raise ValueError(f"{pattern!r}: write internationalised labels without globs, or in punycode")
            try:
                labels.append(label.encode("idna").decode("ascii").lower())
            except UnicodeError:
                raise ValueError(f"{pattern!r} cannot be IDNA-encoded") from None
        pattern = ".".join(labels)
    if not _PATTERN.fullmatch(pattern):
        raise ValueError(f"{pattern!r} is not a host pattern (a name or glob like *.example.com, no scheme or port)")
    return pattern
