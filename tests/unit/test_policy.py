"""Destination policy (moxy.policy): address classes, numeric host spellings, URL shape, host patterns.

Expected values are written out by hand from the RFCs and the WHATWG URL Standard, never computed with
moxy.policy; the hypothesis spellings are built by an independent encoder in this file."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from moxy.errors import ConfigError, DestinationRefused
from moxy.policy import DestinationPolicy, IPAddress, Target, address_refusal, parse_host

OPEN = DestinationPolicy()
LOOPBACK_ALLOWED = DestinationPolicy.from_settings_values(["127.0.0.0/8", "::1/128"], [], [])
ip = ipaddress.ip_address


# -- address classes ---------------------------------------------------------------------------------------

REFUSED_ADDRESSES = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.0.1", "link-local"),
    ("169.254.169.254", "link-local (cloud metadata)"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.0.0.8", "special-purpose"),
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "reserved"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("233.252.0.1", "documentation"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.254", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fc00::1", "private"),
    ("fdff:ffff::1", "private"),
    ("fd00:ec2::254", "private (cloud metadata)"),
    ("fe80::1", "link-local"),
    ("febf::1", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("100::1", "discard-only"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "benchmarking"),
    ("2001:10::1", "special-purpose"),
    ("5f00::1", "reserved"),
    ("4000::1", "reserved"),  # outside 2000::/3, unallocated
    ("1::1", "reserved"),
    # IPv6 embeddings of IPv4
    ("::ffff:127.0.0.1", "ipv4-mapped loopback"),
    ("::ffff:10.1.2.3", "ipv4-mapped private"),
    ("::ffff:169.254.169.254", "ipv4-mapped link-local (cloud metadata)"),
    ("::ffff:0.0.0.0", "ipv4-mapped unspecified"),
    ("::127.0.0.1", "ipv4-compatible"),
    ("::8.8.8.8", "ipv4-compatible"),  # deprecated form: refused whatever it carries
    ("::ffff:0:127.0.0.1", "ipv4-translated"),
    ("::ffff:0:8.8.8.8", "ipv4-translated"),
    ("2002:7f00:1::", "6to4 of loopback"),
    ("2002:c0a8:101::1", "6to4 of private"),
    ("2002:a9fe:a9fe::", "6to4 of link-local (cloud metadata)"),
    ("64:ff9b::7f00:1", "nat64 of loopback"),
    ("64:ff9b::169.254.1.1", "nat64 of link-local"),
    ("64:ff9b::a00:1", "nat64 of private"),
    # Local-use NAT64 (RFC 8215): every RFC 6052 §2.2 layout is judged, the /96 one named first.
    ("64:ff9b:1::a00:1", "nat64 of private"),
    ("64:ff9b:1:abcd:ef01:2345:a9fe:a9fe", "nat64 of link-local (cloud metadata)"),
    ("64:ff9b:1:a00:1::", "nat64 of unspecified"),  # 10.0.0.1 in the /48 layout; /96 reads 0.0.0.0
    ("2001::1", "teredo"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),  # RFC 4380 §4 example, public client: still refused
]

PUBLIC_ADDRESSES = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.15.255.255",
    "172.32.0.0",
    "169.253.255.255",
    "223.255.255.255",
    "2606:4700::1111",
    "2a00:1450:4001:82b::200e",
    "::ffff:8.8.8.8",
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "64:ff9b::8.8.8.8",  # NAT64 of 8.8.8.8
    "64:ff9b::1.1.1.1",
    "64:ff9b:1:abcd:ef01:2345:808:808",  # local-use NAT64 whose every layout decodes to a public IPv4
]


@pytest.mark.parametrize(("text", "label"), REFUSED_ADDRESSES)
def test_refused_address_classes(text: str, label: str) -> None:
    address = ip(text)
    assert address_refusal(address) == label
    with pytest.raises(DestinationRefused) as caught:
        OPEN.check_address(text)
    assert caught.value.reason == f"{label} address {address}"


@pytest.mark.parametrize("text", PUBLIC_ADDRESSES)
def test_public_addresses_are_accepted(text: str) -> None:
    assert address_refusal(ip(text)) is None
    assert OPEN.check_address(text) == ip(text)
    assert OPEN.check_address(ip(text)) == ip(text)


@given(st.ip_addresses())
def test_every_address_judged_public_is_global_for_the_stdlib_too(address: IPAddress) -> None:
    # The stdlib's is_global is an independent oracle for the non-embedding ranges: Moxy may refuse more, never less.
    embeddings = [ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "2002::/16", "64:ff9b::/96", "64:ff9b:1::/48")]
    if any(address in network for network in embeddings):
        return
    if address_refusal(address) is None:
        assert address.is_global


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_form_judged_like_ipv4(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    six_to_four = ipaddress.IPv6Address(int(ipaddress.IPv6Address("2002::")) | int(address) << 80)
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    label = address_refusal(address)
    if label is None:
        assert address_refusal(mapped) is None
        assert address_refusal(six_to_four) is None
        assert address_refusal(nat64) is None
    else:
        assert address_refusal(mapped) == f"ipv4-mapped {label}"
        assert address_refusal(six_to_four) == f"6to4 of {label}"
        assert address_refusal(nat64) == f"nat64 of {label}"


@pytest.mark.parametrize(
    ("address", "accepted"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # the same destination as 127.0.0.1 on a dual-stack socket
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::2", False),
        ("::127.0.0.1", False),  # ipv4-compatible is not the same destination: refused outright
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1 goes through a relay, not to our loopback
        ("64:ff9b::7f00:1", False),  # likewise NAT64
        ("169.254.169.254", False),
    ],
)
def test_allowed_networks_are_precise(address: str, accepted: bool) -> None:
    if accepted:
        assert LOOPBACK_ALLOWED.check_address(address) == ip(address)
    else:
        with pytest.raises(DestinationRefused):
            LOOPBACK_ALLOWED.check_address(address)


@pytest.mark.parametrize(
    "address",
    [
        # Each carries 10.1.2.3 in exactly one RFC 6052 §2.2 layout and public addresses in the other three.
        pytest.param("64:ff9b:1:a01:2:304:808:808", id="layout-48"),
        pytest.param("64:ff9b:1:2d0a:1:203:808:808", id="layout-56"),
        pytest.param("64:ff9b:1:2d2d:a:102:308:808", id="layout-64"),
        pytest.param("64:ff9b:1:2d2d:2d:2d2d:a01:203", id="layout-96"),
    ],
)
def test_local_use_nat64_is_refused_when_any_layout_carries_a_refused_ipv4(address: str) -> None:
    assert address_refusal(ip(address)) == "nat64 of private"


def test_allowed_ipv6_network_does_not_allow_the_ipv4_it_maps() -> None:
    policy = DestinationPolicy.from_settings_values(["::ffff:10.0.0.0/104"], [], [])
    assert policy.check_address("::ffff:10.1.1.1") == ip("::ffff:10.1.1.1")
    with pytest.raises(DestinationRefused):
        policy.check_address("10.1.1.1")


@pytest.mark.parametrize("text", ["fe80::1%eth0", "not-an-ip", "127.0.0.1.", "0x7f.0.0.1", "", "1.2.3"])
def test_check_address_takes_only_canonical_addresses(text: str) -> None:
    # Resolvers return canonical text; numeric spellings belong to URL hosts, not to this entry point.
    with pytest.raises(DestinationRefused):
        LOOPBACK_ALLOWED.check_address(text)


# -- numeric host spellings --------------------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    pytest.param("http://127.0.0.1/", "127.0.0.1", id="dotted"),
    pytest.param("http://2130706433/", "127.0.0.1", id="decimal"),
    pytest.param("http://0177.0.0.1/", "127.0.0.1", id="octal"),
    pytest.param("http://0177.0000.0000.0001/", "127.0.0.1", id="octal-padded"),
    pytest.param("http://017700000001/", "127.0.0.1", id="octal-int"),
    pytest.param("http://0x7f.0.0.1/", "127.0.0.1", id="hex-dotted"),
    pytest.param("http://0X7F.0.0.1/", "127.0.0.1", id="hex-upper"),
    pytest.param("http://0x7f000001/", "127.0.0.1", id="hex-int"),
    pytest.param("http://0x00007f000001/", "127.0.0.1", id="hex-int-padded"),
    pytest.param("http://127.1/", "127.0.0.1", id="short-2"),
    pytest.param("http://127.0.1/", "127.0.0.1", id="short-3"),
    pytest.param("http://0x7f.1/", "127.0.0.1", id="mixed"),
    pytest.param("http://0x7f.0x.0.1/", "127.0.0.1", id="bare-0x-is-zero"),
    pytest.param("http://0x7f.0.0x0.01/", "127.0.0.1", id="mixed-4"),
    pytest.param("http://127.0.0.1./", "127.0.0.1", id="trailing-dot"),
    pytest.param("http://127.1.:8080/", "127.0.0.1", id="short-trailing-dot-port"),
    pytest.param("http://%31%32%37.0.0.1/", "127.0.0.1", id="percent-encoded"),
    pytest.param("http://%30x7f.1/", "127.0.0.1", id="percent-encoded-hex"),
    pytest.param("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/", "127.0.0.1", id="fullwidth"),
    pytest.param("http://127\u30020\u30020\u30021/", "127.0.0.1", id="ideographic-dots"),
    pytest.param("http://127.2.3.4/", "127.2.3.4", id="other-loopback"),
    pytest.param("http://[::1]/", "::1", id="ipv6"),
    pytest.param("http://[0:0:0:0:0:0:0:1]:8080/", "::1", id="ipv6-long"),
    pytest.param("http://[::ffff:7f00:1]/", "::ffff:127.0.0.1", id="ipv4-mapped-hex"),
    pytest.param("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", id="ipv4-mapped-dotted"),
    pytest.param("http://[::FFFF:7F00:1]/", "::ffff:127.0.0.1", id="ipv4-mapped-upper"),
]


@pytest.mark.parametrize(("url", "address"), LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused_by_default(url: str, address: str) -> None:
    with pytest.raises(DestinationRefused) as caught:
        OPEN.check_url(url)
    assert "loopback" in caught.value.reason
    assert str(ip(address)) in caught.value.reason


@pytest.mark.parametrize(("url", "address"), LOOPBACK_SPELLINGS)
def test_loopback_spellings_parse_to_the_address_when_allowed(url: str, address: str) -> None:
    target = LOOPBACK_ALLOWED.check_url(url)
    assert target.address == ip(address)
    assert target.host == str(ip(address))


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/",
        "http://0xa9fea9fe/",
        "http://0xA9.0xFE.0xA9.0xFE/",
        "http://0251.0376.0251.0376/",
        "http://025177524776/",
        "http://169.254.43518/",
        "http://169.16689662/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[fd00:ec2::254]/",
    ],
)
def test_cloud_metadata_in_every_spelling(url: str) -> None:
    with pytest.raises(DestinationRefused) as caught:
        LOOPBACK_ALLOWED.check_url(url)
    assert "cloud metadata" in caught.value.reason


@pytest.mark.parametrize(
    "host",
    [
        "256.1.1.1",
        "1.256.1.1",
        "1.2.3.256",
        "1.2.65536",
        "1.16777216",
        "4294967296",
        "0x100000000",
        "0x7f.0x100.0.1",
        "1.2.3.4.5",
        "08.0.0.1",  # 0-prefixed means octal, and 8 is no octal digit
        "0x7g.1",  # last part numeric, first not a number
        "1.2.3.09",
        "example.123",  # WHATWG: a host ending in a number must be an IPv4
        "example.0x1",
        "1..1",
        "%32%35%36.1.1.1",  # 256.1.1.1 percent-encoded
        "99999999999999999999999999",
    ],
)
def test_numeric_hosts_that_are_no_ipv4_are_refused_not_resolved(host: str) -> None:
    with pytest.raises(DestinationRefused) as caught:
        LOOPBACK_ALLOWED.check_url(f"http://{host}/")
    assert "malformed" in caught.value.reason


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("b\u00fccher.example", "xn--bcher-kva.example"),
        ("B\u00dcCHER.example", "xn--bcher-kva.example"),
        ("%62%C3%BCcher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1.2.3.4.nip.io", "1.2.3.4.nip.io"),  # numeric labels inside a name: a name, left to DNS
        ("0x7g", "0x7g"),  # not a number in any radix, so a (single-label) name
        ("a_b.example", "a_b.example"),
        ("localhost", "localhost"),  # a name: what it resolves to is judged by choose_addresses
        ("\u2603.example", "xn--n3h.example"),  # IDNA 2003 takes symbols; IDNA 2008 fetchers fail closed
    ],
)
def test_names_are_normalised(host: str, expected: str) -> None:
    assert parse_host(host) == (expected, None)


@pytest.mark.parametrize(
    "host",
    [
        "stra\u00dfe.de",  # IDNA 2003 and 2008 disagree (strasse.de vs xn--strae-oqa.de)
        "a\u200db.example",
        "exa%00mple.com",
        "exa%20mple.com",
        "exa%2Fmple.com",
        "exa%ffmple.com",
        "exa%zzmple.com",
        "a..b",
        "a" * 64 + ".example",
        "\u00fc" * 70 + ".example",  # IDNA: label too long
        "b\u00fccher..example",
        ("a" * 60 + ".") * 5 + "com",
        "exa$mple.com",
        "[::1",
        "::1]",
        "[1.2.3.4]",
        "[::1%25eth0]",
        "[fe80::1%eth0]",
        "[::g]",
        ".",
    ],
)
def test_malformed_hosts_are_refused(host: str) -> None:
    with pytest.raises(DestinationRefused):
        parse_host(host)


# The spellings a browser accepts for one IPv4 address, built here with no help from moxy.policy.
def _render_part(value: int, radix: str, padding: int, upper: bool) -> str:
    if radix == "dec":
        return str(value)
    if radix == "oct":
        return "0" * (padding + 1) + format(value, "o")
    digits = format(value, "X" if upper else "x")
    return ("0X" if upper else "0x") + "0" * padding + digits


@st.composite
def spellings(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    value = int(address)
    count = draw(st.integers(1, 4))
    octets = list(address.packed)
    head, tail = octets[: count - 1], int.from_bytes(bytes(octets[count - 1 :]), "big")
    parts = [
        _render_part(part, draw(st.sampled_from(["dec", "oct", "hex"])), draw(st.integers(0, 3)), draw(st.booleans()))
        for part in [*head, tail]
    ]
    assert sum(part << (8 * (3 - i)) for i, part in enumerate(head)) + tail == value
    text = ".".join(parts) + draw(st.sampled_from(["", "."]))
    if draw(st.booleans()):
        text = "".join(f"%{ord(char):02X}" if draw(st.booleans()) else char for char in text)
    return text


PRIVATE_V4 = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8")]


@st.composite
def special_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    networks = [*PRIVATE_V4, ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("100.64.0.0/10")]
    network = draw(st.sampled_from(networks))
    return ipaddress.IPv4Address(int(network.network_address) + draw(st.integers(0, network.num_addresses - 1)))


@given(st.data(), special_ipv4())
def test_every_spelling_of_a_private_address_classifies_like_the_dotted_form(
    data: st.DataObject, address: ipaddress.IPv4Address
) -> None:
    spelling = data.draw(spellings(address))
    assert parse_host(spelling) == (str(address), address)
    with pytest.raises(DestinationRefused) as dotted:
        OPEN.check_url(f"http://{address}/")
    with pytest.raises(DestinationRefused) as spelled:
        OPEN.check_url(f"http://{spelling}/x")
    assert spelled.value.reason == dotted.value.reason


@given(st.data(), st.ip_addresses(v=4))
def test_every_spelling_of_any_ipv4_parses_to_it(data: st.DataObject, address: ipaddress.IPv4Address) -> None:
    spelling = data.draw(spellings(address))
    assert parse_host(spelling) == (str(address), address)


@pytest.mark.parametrize(
    ("spelling", "octal_value"),
    [("0300.0250.01.01", "192.168.1.1"), ("012.0.0.1", "10.0.0.1"), ("00.0.0.0", "0.0.0.0")],
)
def test_leading_zero_means_octal_not_decimal(spelling: str, octal_value: str) -> None:
    assert parse_host(spelling)[1] == ip(octal_value)


# -- URL shape ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/a.png", Target("http", "example.com", 80, None)),
        ("https://example.com/a.png", Target("https", "example.com", 443, None)),
        ("HTTPS://Example.COM:8443/a.png?x=1#f", Target("https", "example.com", 8443, None)),
        ("http://example.com:/a.png", Target("http", "example.com", 80, None)),
        ("http://example.com:0080", Target("http", "example.com", 80, None)),
        ("http://example.com:65535/", Target("http", "example.com", 65535, None)),
        ("http://example.com:1", Target("http", "example.com", 1, None)),
        ("http://example.com?q=@127.0.0.1", Target("http", "example.com", 80, None)),
        ("http://example.com#@127.0.0.1", Target("http", "example.com", 80, None)),
        ("http://example.com/@127.0.0.1", Target("http", "example.com", 80, None)),
        ("https://8.8.8.8:8443/", Target("https", "8.8.8.8", 8443, ip("8.8.8.8"))),
        ("https://[2606:4700::1111]/", Target("https", "2606:4700::1111", 443, ip("2606:4700::1111"))),
        ("https://93.184.216.34", Target("https", "93.184.216.34", 443, ip("93.184.216.34"))),
    ],
)
def test_accepted_urls(url: str, expected: Target) -> None:
    assert OPEN.check_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason_part"),
    [
        ("ftp://example.com/", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://127.0.0.1:6379/_INFO", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("//example.com/", "no scheme"),
        ("example.com/a.png", "no scheme"),
        ("", "empty"),
        ("http:example.com", "no host"),
        ("http:/example.com", "no host"),
        ("http:\\\\example.com", "no host"),
        ("http:///example.com", "no host"),
        ("http://", "no host"),
        ("http://:80/", "no host"),
        ("http://user:pass@example.com/", "credentials"),
        ("http://user@example.com/", "credentials"),
        ("http://@example.com/", "credentials"),
        ("http://example.com@127.0.0.1/", "credentials"),
        ("http://example.com\\@127.0.0.1/", "backslash"),
        ("http://127.0.0.1\\.example.com/", "backslash"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com:65536/", "out of range"),
        ("http://example.com:99999/", "out of range"),
        ("http://example.com:-1/", "malformed port"),
        ("http://example.com:+80/", "malformed port"),
        ("http://example.com:8o/", "malformed port"),
        ("http://example.com:\u0668\u0660/", "malformed port"),  # Arabic-Indic digits: int() would take them
        ("http://example.com:1_0/", "malformed port"),
        ("http://example.com:80:80/", "malformed port"),
        ("http://example.com:000000080/", "malformed port"),
        ("http://[::1]x/", "junk after"),
        ("http://[::1/", "unterminated"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\t", "whitespace"),
        ("http://example.com\n.evil/", "whitespace"),
        ("http://example.com\u00a0/", "whitespace"),
        ("http://[fe80::1%25eth0]/", "zone"),
    ],
)
def test_refused_urls(url: str, reason_part: str) -> None:
    with pytest.raises(DestinationRefused) as caught:
        LOOPBACK_ALLOWED.check_url(url)
    assert reason_part in caught.value.reason


@pytest.mark.parametrize(
    ("target", "authority"),
    [
        (Target("http", "example.com", 80, None), "example.com"),
        (Target("https", "example.com", 443, None), "example.com"),
        (Target("https", "example.com", 80, None), "example.com:80"),
        (Target("http", "::1", 8080, ip("::1")), "[::1]:8080"),
        (Target("https", "::1", 443, ip("::1")), "[::1]"),
        (Target("http", "127.0.0.1", 8080, ip("127.0.0.1")), "127.0.0.1:8080"),
    ],
)
def test_target_authority(target: Target, authority: str) -> None:
    assert target.authority == authority


# -- host patterns -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "deny", "host", "accepted"),
    [
        ((), (), "anything.example", True),
        (("*.example.com",), (), "cdn.example.com", True),
        (("*.example.com",), (), "a.b.example.com", True),
        (("*.example.com",), (), "example.com", False),  # documented: the apex needs its own entry
        (("*.example.com",), (), "evilexample.com", False),
        (("*.example.com",), (), "example.com.evil.net", False),
        (("*.example.com", "example.com"), (), "example.com", True),
        (("cdn.example.org",), (), "cdn.example.org", True),
        (("cdn.example.org",), (), "CDN.Example.ORG.", True),
        (("cdn.example.org",), (), "img.cdn.example.org", False),
        (("CDN.Example.Org.",), (), "cdn.example.org", True),
        (("b\u00fccher.example",), (), "xn--bcher-kva.example", True),
        (("*.b\u00fccher.example",), (), "img.b\u00fccher.example", True),
        (("*.example.com",), ("private.example.com",), "private.example.com", False),  # deny wins
        (("*.example.com",), ("private.example.com",), "public.example.com", True),
        ((), ("*.internal",), "db.internal", False),
        ((), ("*.internal",), "internal.example", True),
        ((), ("evil.example",), "EVIL.example.", False),
        (("8.8.8.8",), (), "8.8.8.8", True),
        (("8.8.8.8",), (), "0x8.0x8.0x8.0x8", True),  # patterns see the normalised host
        (("*.example.com",), (), "8.8.8.8", False),
        ((), ("8.8.8.8",), "134744072", False),
        (("[2606:4700::1111]",), (), "[2606:4700:0::1111]", True),
    ],
)
def test_host_patterns(allow: tuple[str, ...], deny: tuple[str, ...], host: str, accepted: bool) -> None:
    policy = DestinationPolicy.from_settings_values([], allow, deny)
    url = f"https://{host}/pic.png"
    if accepted:
        assert policy.check_url(url).host == parse_host(host)[0]
    else:
        with pytest.raises(DestinationRefused) as caught:
            policy.check_url(url)
        assert "host" in caught.value.reason


def test_direct_construction_normalises_patterns_too() -> None:
    policy = DestinationPolicy(allow_hosts=(" Example.COM. ", ""), deny_hosts=("[::1]",))
    assert policy.allow_hosts == ("example.com",)
    assert policy.deny_hosts == ("::1",)


def test_an_allowed_host_still_needs_an_acceptable_address() -> None:
    policy = DestinationPolicy.from_settings_values([], ["127.0.0.1"], [])
    with pytest.raises(DestinationRefused, match="loopback"):
        policy.check_url("http://127.0.0.1/")


@pytest.mark.parametrize(
    ("networks", "allow", "deny", "setting"),
    [
        (["127.0.0.0/8", "nonsense"], [], [], "MOXY_ALLOWED_NETWORKS"),
        (["10.0.0.0/33"], [], [], "MOXY_ALLOWED_NETWORKS"),
        ([], ["https://example.com"], [], "MOXY_ALLOW_HOSTS"),
        ([], ["example.com:443"], [], "MOXY_ALLOW_HOSTS"),
        ([], [], ["exa mple.com"], "MOXY_DENY_HOSTS"),
        ([], [], ["*.stra\u00dfe.de"], "MOXY_DENY_HOSTS"),
        ([], ["*.b\u00fccher*.example"], [], "MOXY_ALLOW_HOSTS"),
        ([], ["\u00fc" * 70 + ".example"], [], "MOXY_ALLOW_HOSTS"),
    ],
)
def test_bad_settings_name_the_setting(networks: list[str], allow: list[str], deny: list[str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DestinationPolicy.from_settings_values(networks, allow, deny)
    assert caught.value.setting == setting


def test_settings_values_are_parsed() -> None:
    policy = DestinationPolicy.from_settings_values([" 127.0.0.1/8 ", "::1/128"], ["*.Example.com"], ["X.example.com."])
    assert policy.allowed_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert policy.allow_hosts == ("*.example.com",)
    assert policy.deny_hosts == ("x.example.com",)


# -- choosing resolved addresses ---------------------------------------------------------------------------

NAMED = Target("https", "img.example.com", 443, None)


@pytest.mark.parametrize(
    ("resolved", "chosen"),
    [
        (["93.184.216.34"], ["93.184.216.34"]),
        (["2606:4700::1111", "1.1.1.1"], ["2606:4700::1111", "1.1.1.1"]),
        (["1.1.1.1", "8.8.8.8", "1.1.1.1"], ["1.1.1.1", "8.8.8.8"]),
        ([ip("8.8.4.4")], ["8.8.4.4"]),
    ],
)
def test_choose_addresses_keeps_the_resolver_order(resolved: list[str], chosen: list[str]) -> None:
    assert OPEN.choose_addresses(NAMED, resolved) == [ip(text) for text in chosen]


@pytest.mark.parametrize(
    ("resolved", "reason"),
    [
        ([], "resolves to no address"),
        (["8.8.8.8", "10.0.0.1"], "resolves to a private address"),
        (["10.0.0.1", "8.8.8.8"], "resolves to a private address"),
        (["2606:4700::1111", "::1"], "resolves to a loopback address"),
        (["1.1.1.1", "::ffff:169.254.169.254"], "resolves to an ipv4-mapped link-local (cloud metadata) address"),
        (["1.1.1.1", "fe80::1%eth0"], "resolves to an address with a zone identifier"),
        (["1.1.1.1", "bogus"], "resolves to something that is not an address"),
    ],
)
def test_choose_addresses_refuses_when_any_answer_is_refused(resolved: list[str], reason: str) -> None:
    with pytest.raises(DestinationRefused) as caught:
        OPEN.choose_addresses(NAMED, resolved)
    assert caught.value.reason == f"host img.example.com {reason}"
    # The resolved internal address is not disclosed in a reason a 403 body may show.
    assert "10.0.0.1" not in caught.value.reason


def test_choose_addresses_honours_allowed_networks() -> None:
    target = LOOPBACK_ALLOWED.check_url("http://localhost:8081/pic.png")
    assert target == Target("http", "localhost", 8081, None)
    assert LOOPBACK_ALLOWED.choose_addresses(target, ["127.0.0.1", "::1"]) == [ip("127.0.0.1"), ip("::1")]
    with pytest.raises(DestinationRefused):
        OPEN.choose_addresses(target, ["127.0.0.1"])


def test_choose_addresses_for_a_literal_ignores_dns() -> None:
    target = LOOPBACK_ALLOWED.check_url("http://0x7f.1:8081/")
    assert LOOPBACK_ALLOWED.choose_addresses(target, []) == [ip("127.0.0.1")]
    assert LOOPBACK_ALLOWED.choose_addresses(target, ["8.8.8.8"]) == [ip("127.0.0.1")]
    # A Target built by hand is still checked: the literal address must pass the policy that chooses.
    with pytest.raises(DestinationRefused, match="loopback"):
        OPEN.choose_addresses(target, [])


def test_refusal_reason_is_the_error_message() -> None:
    with pytest.raises(DestinationRefused) as caught:
        OPEN.check_url("http://127.0.0.1/")
    assert str(caught.value) == caught.value.reason == "loopback address 127.0.0.1"
