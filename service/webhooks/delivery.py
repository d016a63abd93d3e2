"""One webhook delivery attempt, and the retry policy the dispatcher applies between attempts.

`deliver_once` never raises for network or HTTP trouble: every failure becomes an
`AttemptResult` whose `error` is one class from this tree, in the order it is decided:

    invalid_url        the URL cannot be dialled (bad syntax, scheme, non-canonical IPv4)
    forbidden_address  the host is, or resolves only to, link-local or metadata addresses
    timeout            no status line and headers before the attempt's deadline
    tls_error          the TLS handshake or certificate check failed
    connect_error      no connection: DNS failure, refused, unreachable
    connection_error   the connection broke before an answer (reset, malformed HTTP)
    redirect           a 3xx answer (redirects are never followed)
    http_status        any other non-2xx answer

Once the status line and headers are in, the status decides: a deadline or a broken
connection while reading the excerpt only shortens the excerpt. At most `max_read` bytes
of an answer are read, and at most 2 KB of it, as text, are kept (`models.response_excerpt`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import ssl
import time
from typing import TYPE_CHECKING, Literal

import httpx
import msgspec

from service.models import response_excerpt
from service.outbound import parse_retry_after
from service.webhooks.guard import (
    ForbiddenAddressError,
    Resolver,
    is_forbidden_address,
    literal_address,
)
from service.webhooks.transport import create_guarded_client

if TYPE_CHECKING:
    import random
    from collections.abc import Mapping, Sequence

__all__ = [
    "AttemptResult",
    "ErrorClass",
    "Outcome",
    "create_webhook_client",
    "deliver_once",
    "error_class",
    "next_delay",
    "outcome",
    "parse_retry_schedule",
]

logger = logging.getLogger(__name__)

ErrorClass = Literal[
    "timeout",
    "connect_error",
    "forbidden_address",
    "redirect",
    "http_status",
    "invalid_url",
    "tls_error",
    "connection_error",
]
Outcome = Literal["delivered", "retry", "gone"]


class AttemptResult(msgspec.Struct, frozen=True):
    """What one delivery attempt saw: the answer's status and head of body, or an error class."""

    status_code: int | None
    latency_ms: int
    error: str | None  # one of ErrorClass; None for a 2xx answer
    response_excerpt: str = ""
    retry_after_s: float | None = None


def create_webhook_client(
    *,
    max_connections: int = 256,
    resolver: Resolver | None = None,
    verify: ssl.SSLContext | bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """Build the httpx client for webhook deliveries.

    Every connection is dialled through the connect-time address guard (`resolver` is the
    inner resolver it filters, `verify` the certificate check, the system's by default);
    `transport` replaces the network entirely, for tests that only need a scripted receiver.
    Environment proxies are ignored, cookies are never kept, redirects never followed, and
    answers are not decompressed (we only keep an excerpt, and a compressed answer cannot
    turn into a decompression bomb).
    """
    return create_guarded_client(
        max_connections=max_connections, resolver=resolver, verify=verify, transport=transport
    )


def _error_for_status(status: int) -> ErrorClass | None:
    """Classify an answer's status: 2xx is success, 3xx a refused redirect, the rest failures."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return "redirect"
    return "http_status"


def error_class(exc: BaseException) -> ErrorClass:
    """Map a network exception onto an error class, looking through httpx's wrapping.

    The input pre-flight reads its network failures with this too.
    """
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, ForbiddenAddressError) for e in chain):
        return "forbidden_address"
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return "invalid_url"
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if any(isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain):
        return "tls_error"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    return "connection_error"


async def _read_excerpt(response: httpx.Response, into: bytearray, limit: int) -> None:
    """Append at most `limit` bytes of the answer's body to `into`, never reading further."""
    async for chunk in response.aiter_raw():
        into += chunk[: limit - len(into)]
        if len(into) >= limit:
            return


@functools.lru_cache(maxsize=1024)
def _refusal(url: str) -> tuple[ErrorClass | None, httpx.URL | None]:
    """Refuse what must never be dialled, before any connection: (error class, parsed URL).

    A pure function of the URL, so recent answers are kept: the same few URLs come again.
    """
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        return "invalid_url", None
    if target.scheme not in {"http", "https"} or not target.host:
        return "invalid_url", None
    literal = literal_address(target.host)
    if literal is not None and is_forbidden_address(literal):
        return "forbidden_address", None
    # getaddrinfo would dial 2130706433 or 127.1, but they hide what they name.
    if literal is not None and literal.version == 4 and target.host != str(literal):
        return "invalid_url", None
    return None, target


async def deliver_once(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    deadline_s: float = 15.0,
    max_read: int = 20 * 1024,
) -> AttemptResult:
    """POST `body` to `url` once, under one deadline for connect, send and read, and report.

    Redirects are not followed; at most `max_read` bytes of the answer are read, then the
    connection is closed rather than drained. Only programming errors raise.
    """
    started = time.monotonic()

    def result(
        status: int | None,
        error: ErrorClass | None,
        excerpt: bytes = b"",
        retry: float | None = None,
    ) -> AttemptResult:
        return AttemptResult(
            status_code=status,
            latency_ms=round((time.monotonic() - started) * 1000),
            error=error,
            response_excerpt=response_excerpt(excerpt),
            retry_after_s=retry,
        )

    refused, target = _refusal(url)
    if target is None:
        if refused == "forbidden_address":
            logger.warning("webhook to %s refused: forbidden address", url)
        return result(None, refused)

    status: int | None = None
    retry_after: float | None = None
    excerpt = bytearray()
    failure: ErrorClass = "connection_error"
    try:
        # The one clock for a whole attempt; httpx's per-operation timers are only a
        # backstop (a receiver trickling bytes beats them, never this).
        async with (
            asyncio.timeout(deadline_s),
            client.stream(
                "POST",
                target,
                content=body,
                headers=dict(headers),
                follow_redirects=False,
                timeout=deadline_s,
            ) as response,
        ):
            # Leaving the block with the body unread closes the connection instead of
            # draining whatever a receiver may keep sending.
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            await _read_excerpt(response, excerpt, max_read)
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:  # TimeoutError is an OSError
        failure = error_class(exc)
        if status is None:
            logger.info("webhook to %s failed: %s (%s)", target.host, failure, type(exc).__name__)
    if status is None:
        return result(None, failure)
    return result(status, _error_for_status(status), bytes(excerpt), retry_after)


def outcome(result: AttemptResult) -> Outcome:
    """Decide what an attempt means: any 2xx delivered, 410 gone (stop), anything else retry."""
    if result.status_code is not None and 200 <= result.status_code < 300:
        return "delivered"
    if result.status_code == 410:
        return "gone"
    return "retry"


def parse_retry_schedule(text: str) -> tuple[float, ...]:
    """Parse a comma list of non-negative seconds (`"5,300,1800"`); ValueError otherwise."""
    usage = "a comma-separated list of non-negative seconds, e.g. '5,300,1800'"
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise ValueError(f"webhook retry schedule is empty; expected {usage}")
    delays: list[float] = []
    for item in items:
        try:
            delay = float(item)
        except ValueError:
            raise ValueError(
                f"webhook retry schedule has {item!r}, not a number; expected {usage}"
            ) from None
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"webhook retry schedule has {item!r}; expected {usage}")
        delays.append(delay)
    return tuple(delays)


def next_delay(
    schedule: Sequence[float],
    attempts_made: int,
    retry_after_s: float | None,
    rng: random.Random,
) -> float | None:
    """Return the delay before the next attempt after `attempts_made` failures, None when done.

    The scheduled delay gets ±20% jitter; a Retry-After is honoured within [delay, 2 * delay].
    """
    if attempts_made < 1:
        raise ValueError("next_delay is asked after at least one attempt")
    if attempts_made > len(schedule):
        return None
    delay = schedule[attempts_made - 1] * rng.uniform(0.8, 1.2)
    if retry_after_s is not None:
        delay = min(max(retry_after_s, delay), 2 * delay)
    return delay
