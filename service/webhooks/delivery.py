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
connection while reading the excerpt only shortens the excerpt.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import math
import ssl
import time
from typing import TYPE_CHECKING, Literal

import aiohttp
import msgspec
from yarl import URL

from service.webhooks.guard import (
    ForbiddenAddressError,
    GuardedResolver,
    is_forbidden_address,
    literal_address,
)

if TYPE_CHECKING:
    import random
    from collections.abc import Mapping, Sequence

    from aiohttp.abc import AbstractResolver

__all__ = [
    "AttemptResult",
    "ErrorClass",
    "Outcome",
    "create_webhook_session",
    "deliver_once",
    "next_delay",
    "outcome",
    "parse_retry_after",
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

# deliver_once's asyncio deadline is the one clock for a whole attempt; aiohttp's own
# per-operation timers would only add a second, inconsistent one (and a trickle beats them).
_NO_AIOHTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None)


class AttemptResult(msgspec.Struct, frozen=True):
    """What one delivery attempt saw: the answer's status and head of body, or an error class."""

    status_code: int | None
    latency_ms: int
    error: str | None  # one of ErrorClass; None for a 2xx answer
    response_excerpt: str = ""
    retry_after_s: float | None = None


def create_webhook_session(
    *, limit: int = 256, limit_per_host: int = 8, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """Build the session for webhook deliveries; call it inside the running event loop.

    `resolver` is the inner resolver, always wrapped in GuardedResolver. Environment proxies
    are ignored, cookies are never kept, and answers are not decompressed (we only keep an
    excerpt, and a compressed answer cannot turn into a decompression bomb).
    """
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=limit_per_host, resolver=GuardedResolver(resolver)
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        # Without decompression, ask receivers for plain bytes so the excerpt stays readable.
        headers={"accept-encoding": "identity"},
        timeout=_NO_AIOHTTP_TIMEOUT,
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the seconds a `Retry-After` value asks for (delay-seconds or HTTP-date), else None."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP-dates are always GMT
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _error_for_status(status: int) -> ErrorClass | None:
    """Classify an answer's status: 2xx is success, 3xx a refused redirect, the rest failures."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return "redirect"
    return "http_status"


def _error_for_exception(exc: BaseException) -> ErrorClass:
    """Map a network exception onto an error class, looking through aiohttp's wrapping."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, ForbiddenAddressError) for e in chain):
        return "forbidden_address"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return "invalid_url"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch) or any(
        isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain
    ):
        return "tls_error"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    return "connection_error"


async def _read_excerpt(response: aiohttp.ClientResponse, into: bytearray, limit: int) -> None:
    """Append at most `limit` bytes of the answer's body to `into`, never reading further."""
    while len(into) < limit:
        chunk = await response.content.read(limit - len(into))
        if not chunk:
            return
        into += chunk


async def deliver_once(
    session: aiohttp.ClientSession,
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
            response_excerpt=excerpt.decode("utf-8", errors="replace"),
            retry_after_s=retry,
        )

    try:
        target = URL(url)
    except ValueError:
        return result(None, "invalid_url")
    if target.scheme not in {"http", "https"} or not target.host:
        return result(None, "invalid_url")
    # aiohttp skips the resolver (and so the guard) for IP literals: check them here.
    if _forbidden_literal(target.host):
        logger.warning("webhook to %s refused: forbidden address", target.host)
        return result(None, "forbidden_address")

    status: int | None = None
    retry_after: float | None = None
    excerpt = bytearray()
    failure: ErrorClass = "connection_error"
    try:
        async with asyncio.timeout(deadline_s):
            response = await session.post(
                target,
                data=body,
                headers=dict(headers),
                allow_redirects=False,
                timeout=_NO_AIOHTTP_TIMEOUT,
            )
            try:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await _read_excerpt(response, excerpt, max_read)
            finally:
                # A fully read answer lets the connection be reused; otherwise close it
                # instead of draining what a receiver may keep sending forever.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()
    except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
        failure = _error_for_exception(exc)
        if status is None:
            logger.info("webhook to %s failed: %s (%s)", target.host, failure, type(exc).__name__)
    if status is None:
        return result(None, failure)
    return result(status, _error_for_status(status), bytes(excerpt), retry_after)


@functools.lru_cache(maxsize=1024)
def _forbidden_literal(host: str) -> bool:
    """Whether `host` is an IP literal that must never be dialled (a pure function, so cached)."""
    literal = literal_address(host)
    return literal is not None and is_forbidden_address(literal)


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
