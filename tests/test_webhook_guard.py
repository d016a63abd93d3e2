import ipaddress
import socket
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.webhooks.guard import (
    MAX_URL_LENGTH,
    AddressPolicy,
    ForbiddenAddressError,
    GuardedResolver,
    callback_url_problem,
    is_forbidden_address,
    literal_address,
    parse_host_address,
)
from tests.support import FakeResolver, inet_aton_spelling

ALLOWED = [
    "orders.default.svc.cluster.local",
    "*.orders.internal",
    "Bücher.example",
    "127.0.0.1",
    "[::1]",
    "169.254.169.254",  # listed by mistake: still refused
]

METADATA_FORMS = [
    "169.254.169.254",
    "169.254.0.1",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::ffff:0:169.254.169.254",  # IPv4-translated (SIIT)
    "::169.254.169.254",  # IPv4-compatible
    "64:ff9b::169.254.169.254",  # NAT64 well-known prefix
    "64:ff9b:1::a9fe:a9fe",  # NAT64 local-use prefix, /96
    "64:ff9b:1:a9fe:a9:fe00::",  # NAT64 local-use prefix, /48 layout
    "2002:a9fe:a9fe::1",  # 6to4
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo client 169.254.169.254
    "fd00:ec2::254",  # AWS IPv6 metadata
    "fe80::1",
    "fe80::1%eth0",
    "100.100.100.200",  # Alibaba metadata
    "0.0.0.0",  # noqa: S104 - an address under test, nothing binds to it
    "::",
    "::ffff:0.0.0.0",
]

ORDINARY = [
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "fd12:3456::1",
    "8.8.8.8",
    "2001:db8::1",
    "64:ff9b::8.8.8.8",
    "2002:808:808::1",
    "fd00:ec2::253",
]


@pytest.mark.parametrize("addr", METADATA_FORMS)
def test_metadata_and_link_local_forms_are_forbidden(addr):
    """Link-local, metadata and unspecified addresses are forbidden in every IPv6 disguise."""
    assert is_forbidden_address(addr)
    assert is_forbidden_address(ipaddress.ip_address(addr.split("%")[0]))


@pytest.mark.parametrize("addr", ORDINARY)
def test_loopback_private_and_public_addresses_are_allowed(addr):
    """Loopback, private and public addresses are not forbidden: callback_hosts restricts."""
    assert not is_forbidden_address(addr)


def test_is_forbidden_address_rejects_a_non_address():
    """A string that is not an IP address is a caller's mistake and raises ValueError."""
    with pytest.raises(ValueError, match="does not appear to be"):
        is_forbidden_address("example.com")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("[::1]", "::1"),
        ("2852039166", "169.254.169.254"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("169.254.43518", "169.254.169.254"),
        ("example.com", None),
        ("cafe.be", None),
    ],
)
def test_literal_address_understands_legacy_spellings(host, expected):
    """Legacy inet_aton spellings count as IP literals; host names do not."""
    found = literal_address(host)
    assert (str(found) if found else None) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://orders.default.svc.cluster.local/hooks",
        "http://orders.default.svc.cluster.local:8080/hooks?x=1",
        "https://ORDERS.Default.svc.cluster.local./hooks",
        "https://a.orders.internal/hooks",
        "https://deep.a.orders.internal/hooks",
        "https://bücher.example/hook",
        "https://xn--bcher-kva.example/hook",
        "http://127.0.0.1:9000/hook",
        "http://[::1]:9000/hook",
    ],
)
def test_acceptable_urls_pass(url):
    """URLs on a listed host, a wildcard subdomain or a listed IP are accepted."""
    assert callback_url_problem(url, ALLOWED) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://orders.internal/hooks", "not in this tenant's callback_hosts"),
        ("https://evil.example/hooks", "not in this tenant's callback_hosts"),
        ("https://orders.internal.evil.example/", "not in this tenant's callback_hosts"),
        ("https://xorders.internal/", "not in this tenant's callback_hosts"),
        ("https://default.svc.cluster.local/", "not in this tenant's callback_hosts"),
        ("http://10.0.0.1/hook", "not in this tenant's callback_hosts"),
        ("ftp://orders.default.svc.cluster.local/", "scheme must be http or https"),
        ("file:///etc/passwd", "scheme must be http or https"),
        ("javascript:alert(1)", "scheme must be http or https"),
        ("//orders.default.svc.cluster.local/", "scheme must be http or https"),
        ("orders.default.svc.cluster.local/hooks", "scheme must be http or https"),
        ("http:///hooks", "has no host"),
        ("https://user:pw@orders.default.svc.cluster.local/", "user:password"),
        ("https://user@orders.default.svc.cluster.local/", "user:password"),
        ("https://@orders.default.svc.cluster.local/", "user:password"),
        ("https://evil.example\\@orders.default.svc.cluster.local/", "not a valid"),
        ("https://orders.default.svc.cluster.local\n/", "whitespace or control"),
        ("https://a.orders.internal%2eevil.example/", "not a valid host name"),
        ("http://169.254.169.254/latest/meta-data/", "link-local or cloud metadata"),
        ("http://[::ffff:169.254.169.254]/", "link-local or cloud metadata"),
        ("http://[fd00:ec2::254]/", "link-local or cloud metadata"),
        ("http://2852039166/", "link-local or cloud metadata"),
        ("http://2130706433/", "plain dotted quad"),
        ("http://127.1/", "plain dotted quad"),
        ("http://127.0.0.1./", "plain dotted quad"),
        ("http://0x7f000001/", "plain dotted quad"),
        # httpx refuses leading zeros before any rule looks at the address.
        ("http://0177.0.0.1/", "not a valid"),
        ("http://127.000.000.001/", "not a valid"),
        ("http://0x7f.1/", "plain dotted quad"),
        ("http://localhost./", "not in this tenant's callback_hosts"),
        ("http://LOCALHOST/", "not in this tenant's callback_hosts"),
        ("http://0xa9fea9fe/", "link-local or cloud metadata"),
        ("http://0251.0376.0251.0376/", "not a valid"),
        ("http://169.254.43518/", "link-local or cloud metadata"),
        ("http://0/", "link-local or cloud metadata"),
        ("https://orders.default.svc.cluster.local:99999/", "not a valid"),
    ],
)
def test_unacceptable_urls_are_refused_with_a_reason(url, reason):
    """Every rule refuses its URLs with a short reason naming the rule."""
    problem = callback_url_problem(url, ALLOWED)
    assert problem is not None
    assert reason in problem


def test_wildcard_does_not_admit_the_bare_suffix():
    """`*.orders.internal` admits its subdomains but not orders.internal itself."""
    assert callback_url_problem("https://x.orders.internal/", ["*.orders.internal"]) is None
    assert callback_url_problem("https://orders.internal/", ["*.orders.internal"]) is not None


def test_url_length_limit():
    """A URL of exactly 2048 characters passes; one more is refused."""
    base = "https://orders.default.svc.cluster.local/"
    longest = base + "a" * (MAX_URL_LENGTH - len(base))
    assert callback_url_problem(longest, ALLOWED) is None
    problem = callback_url_problem(longest + "a", ALLOWED)
    assert problem is not None
    assert "longer than 2048" in problem


def test_no_allowed_hosts_refuses_everything():
    """A tenant without callback_hosts cannot register any webhook URL."""
    assert callback_url_problem("https://orders.default.svc.cluster.local/", []) is not None


async def test_resolver_refuses_a_name_that_resolves_only_to_metadata():
    """A host name re-pointed at the metadata service raises ForbiddenAddressError."""
    resolver = GuardedResolver(FakeResolver({"rebind.test": ["169.254.169.254"]}))
    with pytest.raises(ForbiddenAddressError):
        await resolver.resolve("rebind.test", 443)


async def test_resolver_refuses_metadata_in_an_ipv6_disguise():
    """An AAAA answer carrying 169.254.169.254 as IPv4-mapped is refused too."""
    resolver = GuardedResolver(FakeResolver({"mapped.test": ["::ffff:169.254.169.254"]}))
    with pytest.raises(ForbiddenAddressError):
        await resolver.resolve("mapped.test", 443)


async def test_resolver_drops_forbidden_answers_and_keeps_the_rest():
    """Of a mixed answer only the allowed addresses are returned."""
    resolver = GuardedResolver(
        FakeResolver({"mixed.test": ["169.254.169.254", "10.0.0.7", "fe80::1", "fd12::7"]})
    )
    assert await resolver.resolve("mixed.test", 443) == ["10.0.0.7", "fd12::7"]


async def test_resolver_fails_closed_on_an_answer_that_is_not_an_address():
    """An answer that is not an IP address is never dialled."""
    resolver = GuardedResolver(FakeResolver({"junk.test": ["not-an-ip"]}))
    with pytest.raises(ForbiddenAddressError):
        await resolver.resolve("junk.test", 443)


async def test_a_public_only_resolver_keeps_only_public_answers():
    """The input client's policy drops private, loopback and unique-local answers too."""
    policy = AddressPolicy(public_only=True)
    answers = ["10.0.0.7", "127.0.0.1", "fd12::7", "93.184.215.14", "2606:4700::1"]
    resolver = GuardedResolver(FakeResolver({"mixed.test": answers}), policy)
    assert await resolver.resolve("mixed.test", 443) == ["93.184.215.14", "2606:4700::1"]
    private = GuardedResolver(FakeResolver({"lan.test": ["10.0.0.7", "::1"]}), policy)
    with pytest.raises(ForbiddenAddressError, match="non-public"):
        await private.resolve("lan.test", 443)


@pytest.mark.parametrize("host", ["bench.test", "a.lab.test", "127.0.0.1", "::1"])
def test_a_listed_host_may_be_dialled_on_its_private_addresses(host):
    """An allowed host (exact or `*.suffix`) reaches private addresses, an unlisted one not."""
    policy = AddressPolicy(
        public_only=True, private_hosts=("bench.test", "*.lab.test", "127.0.0.1", "[::1]")
    )
    address = host if ":" in host or host[0].isdigit() else "10.1.2.3"
    assert policy.allows(host, address)
    assert not AddressPolicy(public_only=True, private_hosts=("other.test",)).allows(host, address)


@pytest.mark.parametrize("address", METADATA_FORMS)
def test_a_listed_host_never_reaches_metadata(address):
    """Listing a host opens its private addresses, never link-local or metadata ones."""
    listed = ("bench.test", "169.254.169.254", "*.test")
    assert not AddressPolicy(public_only=True, private_hosts=listed).allows("bench.test", address)
    assert not AddressPolicy(public_only=True, private_hosts=listed).allows(address, address)


def test_a_listed_ipv4_host_matches_only_as_a_dotted_quad():
    """127.1 names 127.0.0.1 but hides it: listing 127.0.0.1 does not admit it."""
    policy = AddressPolicy(public_only=True, private_hosts=("127.0.0.1",))
    assert policy.allows("127.0.0.1", "127.0.0.1")
    assert not policy.allows("127.1", "127.0.0.1")


async def test_resolver_passes_inner_errors_through():
    """A lookup failure of the inner resolver is not turned into a forbidden address."""
    resolver = GuardedResolver(FakeResolver({}))
    with pytest.raises(OSError, match="unknown host") as e:
        await resolver.resolve("missing.test", 443)
    assert not isinstance(e.value, ForbiddenAddressError)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x7f.0.1", "127.0.0.1"),
        ("127.000.000.001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),  # noqa: S104 - an address under test
        ("0x0", "0.0.0.0"),  # noqa: S104 - an address under test
        ("4294967295", "255.255.255.255"),
        ("1.16777215", "1.255.255.255"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("localhost", None),
        ("localhost.", None),
        ("0x", None),  # inet_aton wants a hex digit after 0x
        ("08", None),  # not octal
        ("4294967296", None),  # over 32 bits
        ("1.16777216", None),
        ("256.1", None),
        ("1.2.3.4.5", None),
        ("1..2", None),
        ("+1", None),
        ("1e3", None),
        ("", None),
    ],
)
def test_parse_host_address_reads_every_inet_aton_spelling(host, expected):
    """Decimal, octal and hex parts, one to four of them, name the address resolvers dial."""
    found = parse_host_address(host)
    assert (str(found) if found is not None else None) == expected


@given(
    st.ip_addresses(v=4),
    st.integers(1, 4),
    st.lists(st.sampled_from([8, 10, 16]), min_size=4, max_size=4),
)
def test_every_spelling_of_an_address_parses_to_it(address, parts, bases):
    """However an IPv4 address is spelled (1-4 parts, any bases), it parses back to itself."""
    spelled = inet_aton_spelling(int(address), parts, bases)
    assert parse_host_address(spelled) == address


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's inet_aton")
@given(st.text("0123456789abcdefxX.", max_size=20).filter(lambda h: not h.endswith(".")))
def test_parse_host_address_agrees_with_the_platform_inet_aton(host):
    """On any string of digits, hex letters, x and dots, parsing agrees with glibc's inet_aton."""
    try:
        expected: ipaddress.IPv4Address | None = ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        expected = None
    assert parse_host_address(host) == expected
