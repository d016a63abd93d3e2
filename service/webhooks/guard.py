"""The address guard: which webhook URLs a tenant may register, and which addresses we dial.

Two checks, at two times. At submit time `callback_url_problem` vets the URL's form and host
against the tenant's `callback_hosts`. At connect time `GuardedNetworkBackend`, the httpcore
network backend under the webhook and input clients, resolves the host itself, drops the
addresses its `AddressPolicy` refuses from the answer (`GuardedResolver`) and dials only what
is left, so a name that is re-pointed after submit (DNS rebinding) still cannot reach them; an
IP-literal host is checked the same way, on the address it names. TLS still verifies the URL's
host name. Link-local and cloud metadata addresses are refused by every policy; the input
client's policy also refuses every other non-public address, except on the hosts it lists.

`parse_host_address` reads a host the way resolvers do, legacy inet_aton spellings included
(127.1, 2130706433, 0x7f000001, 0177.0.0.1), so a disguised address is seen for what it is.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias
from urllib.parse import urlsplit

import httpcore
import httpx

__all__ = [
    "MAX_URL_LENGTH",
    "AddressPolicy",
    "ForbiddenAddressError",
    "GuardedNetworkBackend",
    "GuardedResolver",
    "Resolver",
    "SystemResolver",
    "callback_url_problem",
    "embedded_ipv4",
    "host_listed",
    "is_forbidden_address",
    "is_public_address",
    "literal_address",
    "normalise_host",
    "parse_host_address",
]

logger = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# Link-local (where every cloud's metadata service lives: AWS, GCP, Azure, OCI, DigitalOcean),
# "this network" (0.0.0.0 reaches the local host on Linux), Alibaba's metadata service and
# Azure's WireServer. Loopback and private ranges stay allowed: operators call in-cluster
# receivers, and `callback_hosts` is what restricts destinations.
_FORBIDDEN_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in ("169.254.0.0/16", "0.0.0.0/8", "100.100.100.200/32", "168.63.129.16/32")
)
# Link-local, AWS's IPv6 metadata endpoint, and the unspecified address.
_FORBIDDEN_V6 = tuple(ipaddress.IPv6Network(net) for net in ("fe80::/10", "fd00:ec2::254/128"))

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, still routed by some stacks
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215; operators pick the length
# Prefixes whose addresses carry the IPv4 address in their last 32 bits.
_LOW_32_BITS = (_IPV4_MAPPED, _IPV4_TRANSLATED, _IPV4_COMPATIBLE, _NAT64_WELL_KNOWN)
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")

# One part of an inet_aton address: hex (0x1f), octal (017; 0 itself) or decimal (17).
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
# A DNS name as it reaches the wire after IDNA encoding (underscore: some internal names use it).
_DNS_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


class ForbiddenAddressError(OSError):
    """A host named or resolved only to addresses the policy refuses, so nothing was dialled."""


def _rfc6052_ipv4(value: int, prefix_len: int) -> ipaddress.IPv4Address:
    """Extract the IPv4 address a NAT64 prefix of `prefix_len` bits embeds (RFC 6052 §2.2)."""
    if prefix_len == 96:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    # Bits 64-71 (the "u" octet) are skipped: the v4 bits sit either side of it.
    before_u = 64 - prefix_len
    high = (value >> 64) & ((1 << before_u) - 1)
    low = (value >> (56 - (32 - before_u))) & ((1 << (32 - before_u)) - 1)
    return ipaddress.IPv4Address((high << (32 - before_u)) | low)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address may carry through a translation or tunnel."""
    value = int(addr)
    found: list[ipaddress.IPv4Address] = []
    if any(addr in net for net in _LOW_32_BITS):
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    elif addr in _NAT64_LOCAL:
        found.extend(_rfc6052_ipv4(value, length) for length in (48, 56, 64, 96))
    elif addr in _SIX_TO_FOUR:
        found.append(ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF))
    elif addr in _TEREDO and addr.teredo is not None:
        found.extend(addr.teredo)  # (server, client), the client already de-obfuscated
    return found


def _parse_address(addr: str | IPAddress) -> IPAddress:
    """Parse an address string, accepting an IPv6 zone (`fe80::1%eth0`)."""
    if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return addr
    return ipaddress.ip_address(addr.strip("[]"))


def is_forbidden_address(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Tell whether an address is link-local, unspecified or a cloud metadata endpoint.

    IPv4 addresses embedded in IPv6 (mapped, compatible, NAT64, 6to4, Teredo) are checked too.
    Raise ValueError when `addr` is a string that is not an IP address.
    """
    ip = _parse_address(addr)
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in net for net in _FORBIDDEN_V4)
    if ip.is_loopback:
        return False  # ::1 sits inside ::/96 but is plainly the local host, not an IPv4 form
    if ip.is_unspecified or any(ip in net for net in _FORBIDDEN_V6):
        return True
    return any(is_forbidden_address(v4) for v4 in embedded_ipv4(ip))


def is_public_address(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Tell whether an address is global and no metadata endpoint, nor carries a non-public IPv4.

    IPv4 addresses embedded in IPv6 (NAT64, 6to4, Teredo) must be public too.
    Raise ValueError when `addr` is a string that is not an IP address.
    """
    ip = _parse_address(addr)
    if not ip.is_global or is_forbidden_address(ip):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return all(is_public_address(v4) for v4 in embedded_ipv4(ip))
    return True


def parse_host_address(host: str) -> IPAddress | None:
    """The address a URL host names, in any spelling resolvers accept; None for a host name.

    An IPv4 host is read as inet_aton (so getaddrinfo, curl and WHATWG URL parsers) reads it:
    one to four dot-separated parts, each decimal, octal (leading 0) or hex (0x), the last
    filling the bytes left, so 127.1, 2130706433, 0x7f000001 and 0177.0.0.1 all name
    127.0.0.1. Brackets and trailing dots are ignored. Pure Python: the same on every platform.
    """
    host = host.strip("[]").rstrip(".")
    if ":" in host:
        try:
            return ipaddress.ip_address(host)
        except ValueError:
            return None
    parts = host.split(".")
    if len(parts) > 4 or not all(_INET_ATON_PART.fullmatch(part) for part in parts):
        return None
    *head, last = [_inet_aton_number(part) for part in parts]
    if any(number > 0xFF for number in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = last
    for position, number in enumerate(head):
        value |= number << (8 * (3 - position))
    return ipaddress.IPv4Address(value)


def _inet_aton_number(part: str) -> int:
    if part[:2] in {"0x", "0X"}:
        return int(part, 16)
    return int(part, 8) if part.startswith("0") else int(part)


literal_address = parse_host_address
"""The name the delivery code knows `parse_host_address` by."""


@functools.lru_cache(maxsize=1024)
def normalise_host(host: str) -> str | None:
    """Lower-case, strip the trailing dot and IDNA-encode a host name; None when it is not one."""
    host = host.strip().strip("[]").rstrip(".")
    if not host:
        return None
    if parse_host_address(host) is not None:
        return host.lower()
    try:
        encoded = httpx.URL(scheme="http", host=host).raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError):
        return None
    encoded = encoded.lower().rstrip(".")
    return encoded if _DNS_NAME.fullmatch(encoded) else None


def _host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Match a normalised DNS host against exact entries and `*.suffix` wildcards."""
    for entry in allowed_hosts:
        if entry.startswith("*."):
            suffix = normalise_host(entry[2:])
            # A strict subdomain only: `*.orders.internal` does not admit `orders.internal`.
            if suffix is not None and host.endswith("." + suffix):
                return True
        elif normalise_host(entry) == host:
            return True
    return False


def _literal_allowed(ip: IPAddress, allowed_hosts: Sequence[str]) -> bool:
    """Match an IP-literal host against entries naming exactly that address."""
    for entry in allowed_hosts:
        try:
            if ipaddress.ip_address(entry.strip().strip("[]")) == ip:
                return True
        except ValueError:
            continue
    return False


def host_listed(host: str, listed: Sequence[str]) -> bool:
    """Tell whether a URL host is one of `listed`: exact names or addresses, `*.suffix` wildcards.

    Names are compared IDNA-encoded, lower-case, without a trailing dot; an IPv4 host must be
    written as a plain dotted quad to match (127.1 hides what it names).
    """
    ip = parse_host_address(host)
    if ip is not None:
        written = host.strip("[]").rstrip(".")
        return (ip.version == 6 or written == str(ip)) and _literal_allowed(ip, listed)
    name = normalise_host(host)
    return name is not None and _host_allowed(name, listed)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a client may dial for a host.

    Link-local and metadata addresses never. Everything else by default (webhooks: operators
    call in-cluster receivers, and `callback_hosts` restricts destinations); with
    `public_only`, only public addresses, except that the hosts in `private_hosts` may be
    dialled on their private addresses too (never on link-local or metadata ones).
    """

    public_only: bool = False
    private_hosts: tuple[str, ...] = ()

    def allows(self, host: str, addr: str | IPAddress) -> bool:
        """Whether `addr`, an address `host` names or resolved to, may be dialled."""
        try:
            ip = _parse_address(addr)
        except ValueError:
            return False  # fail closed: an answer that is not an address is never dialled
        if is_forbidden_address(ip):
            return False
        return (
            not self.public_only or is_public_address(ip) or host_listed(host, self.private_hosts)
        )


# A flat list of rules, one return each, reads better than folding them together.
def _form_problem(url: str) -> tuple[str | None, httpx.URL | None]:  # noqa: PLR0911
    """Check what any webhook URL must be, whoever the tenant; return (problem, parsed URL)."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL is longer than {MAX_URL_LENGTH} characters", None
    # Browsers silently drop tabs and newlines; refuse them rather than guess.
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "URL contains whitespace or control characters", None
    # In the authority a browser reads a backslash as a slash, httpx as part of the user
    # name: the two would disagree on the host (`https://evil.example\@good.example/`).
    try:
        authority = urlsplit(url).netloc
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL):  # e.g. an unclosed `[` of an IPv6 literal
        return "URL is not a valid absolute URL", None
    if "\\" in authority:
        return "URL is not a valid absolute URL", None
    if parsed.scheme not in {"http", "https"}:
        return "URL scheme must be http or https", None
    if not parsed.raw_host:
        return "URL has no host", None
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return "URL port is not a valid port", None
    # httpx drops an empty userinfo (`http://@host/`), so look at the authority as written too.
    if parsed.userinfo or "@" in authority:
        return "URL must not carry user:password", None
    return None, parsed


def _literal_problem(raw_host: str, ip: IPAddress, allowed_hosts: Sequence[str]) -> str | None:
    """Check an IP-literal host: never forbidden, canonical, and listed exactly."""
    if is_forbidden_address(ip):
        return "URL points at a link-local or cloud metadata address"
    # getaddrinfo would dial 2130706433, 127.1 and friends, but they hide what they name.
    if ip.version == 4 and raw_host != str(ip):
        return "an IPv4 host must be written as a plain dotted quad"
    if not _literal_allowed(ip, allowed_hosts):
        return f"host {ip} is not in this tenant's callback_hosts"
    return None


def callback_url_problem(url: str, allowed_hosts: Sequence[str]) -> str | None:
    """Return None when a tenant may use `url` as its webhook URL, else a short reason why not.

    Parsing is httpx's, the same parser the webhook client dials with, so what is checked is
    what is dialled. The answer depends on nothing else, so recent answers are kept: the dispatcher
    asks again before every attempt, in case the tenants file changed.
    """
    return _callback_url_problem(url, tuple(allowed_hosts))


@functools.lru_cache(maxsize=1024)
def _callback_url_problem(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    problem, parsed = _form_problem(url)
    if parsed is None:
        return problem
    raw_host = parsed.raw_host.decode("ascii")
    ip = parse_host_address(parsed.host)
    if ip is not None:
        return _literal_problem(raw_host, ip, allowed_hosts)
    host = normalise_host(raw_host)
    if host is None:
        return "URL host is not a valid host name"
    if not _host_allowed(host, allowed_hosts):
        return f"host {host} is not in this tenant's callback_hosts"
    return None


class Resolver(Protocol):
    """Turns a host name into the addresses it names (a test gives a fixed table)."""

    async def resolve(self, host: str, port: int) -> Sequence[str]:
        """The addresses `host` resolves to, in the order to try them; OSError when none."""
        ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo), run off the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        """Every distinct address getaddrinfo answers for `host`, in its order."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedResolver:
    """A resolver that drops the addresses its policy refuses from another resolver's answers.

    This is the DNS-rebinding defence: it runs at connect time on the addresses actually
    dialled. When nothing is left it raises ForbiddenAddressError.
    """

    def __init__(self, inner: Resolver | None = None, policy: AddressPolicy | None = None) -> None:
        self._inner = inner if inner is not None else SystemResolver()
        self.policy = policy if policy is not None else AddressPolicy()

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve with the inner resolver and keep only addresses that may be dialled."""
        answers = list(await self._inner.resolve(host, port))
        kept = [addr for addr in answers if self.policy.allows(host, addr)]
        if len(kept) < len(answers):
            dropped = sorted(set(answers) - set(kept))
            logger.warning("host %s resolved to addresses it may not dial: %s", host, dropped)
        if not kept:
            raise ForbiddenAddressError(f"host {host} resolves only to {self._refused()}")
        return kept

    def _refused(self) -> str:
        if self.policy.public_only:
            return "non-public (private, loopback, link-local or metadata) addresses"
        return "link-local or metadata addresses"


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that dials only addresses the guard allows.

    httpcore hands `connect_tcp` the URL's host; this resolves it (or reads the address an IP
    literal names), drops forbidden addresses and dials the first allowed one that answers,
    all within the connect timeout. TLS is started afterwards by httpcore on the stream this
    returns, with the URL's host name for SNI and certificate checks. A refusal is an
    `httpcore.ConnectError` caused by ForbiddenAddressError: nothing was sent.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        inner: httpcore.AsyncNetworkBackend | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self._resolver = GuardedResolver(resolver, policy)
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve `host`, drop forbidden addresses, and connect to the first that answers."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._addresses(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:  # ForbiddenAddressError too: the delivery looks for it
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await self._inner.connect_tcp(
                    address, port, remaining, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        if failure is None:  # the resolver answered nothing at all
            raise httpcore.ConnectError(f"{host} resolves to no address")
        raise failure

    async def _addresses(self, host: str, port: int) -> list[str]:
        literal = literal_address(host)
        if literal is None:
            return await self._resolver.resolve(host, port)
        if not self._resolver.policy.allows(host, literal):
            raise ForbiddenAddressError(f"{host} is an address this client may not dial")
        return [str(literal)]

    async def sleep(self, seconds: float) -> None:
        """Sleep as the inner backend does (httpcore's retry backoff)."""
        await self._inner.sleep(seconds)
