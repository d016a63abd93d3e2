"""Input pre-flight: before a job's paid submit, check that its `video_url` answers as a video.

`check_input` never raises for network or HTTP trouble: one check in, one verdict out.

    InputOk                 2xx, `Content-Type` video/* or application/octet-stream, and a
                            stated size (if any) within the limit
    InputRefused            the job fails before any RunComfy call, with `code`:
      input_unreachable     a 4xx (but 429), no connection, a forbidden address (the URL's
                            or a redirect's), more than `MAX_REDIRECTS` redirects, a bad URL
      input_not_video       a 2xx of another `Content-Type`, or of none
      input_too_large       a stated size (`Content-Length`, or `Content-Range`'s total)
                            above the limit
    InputRetry              5xx, 429 or no answer before the deadline: worth another try

It asks with `HEAD`; where HEAD is refused (405, 501) with a `GET` of one byte
(`Range: bytes=0-0`), whose body is never read. Redirects are followed here, not by httpx,
so each hop is dialled by the same guarded client (public addresses only, but for the allowed
hosts); the whole check, every hop included, has one deadline.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import httpx

from service.outbound import parse_retry_after
from service.webhooks.delivery import error_class
from service.webhooks.guard import AddressPolicy, Resolver
from service.webhooks.transport import create_guarded_client

__all__ = [
    "MAX_REDIRECTS",
    "InputOk",
    "InputRefused",
    "InputRetry",
    "Verdict",
    "check_input",
    "create_input_client",
]

MAX_REDIRECTS: Final = 3
_HEAD_REFUSED: Final = frozenset({405, 501})
_CONTENT_RANGE_TOTAL: Final = re.compile(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", re.IGNORECASE)

InputErrorCode: TypeAlias = Literal["input_unreachable", "input_not_video", "input_too_large"]


@dataclass(frozen=True)
class InputOk:
    """The input answered as a video; `size` is what it stated, if anything."""

    content_type: str
    size: int | None


@dataclass(frozen=True)
class InputRefused:
    """The input cannot be used: the job fails with `code` and `message`."""

    code: InputErrorCode
    message: str


@dataclass(frozen=True)
class InputRetry:
    """The input's server is busy, failing or slow: ask again later (`retry_after_s`: its hint)."""

    message: str
    retry_after_s: float | None = None


Verdict: TypeAlias = InputOk | InputRefused | InputRetry


def create_input_client(
    *,
    allow_hosts: Sequence[str] = (),
    max_connections: int = 64,
    resolver: Resolver | None = None,
) -> httpx.AsyncClient:
    """The client pre-flight checks use: public addresses only, but for `allow_hosts`."""
    policy = AddressPolicy(public_only=True, private_hosts=tuple(allow_hosts))
    return create_guarded_client(max_connections=max_connections, policy=policy, resolver=resolver)


async def check_input(
    client: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    deadline_s: float,
    max_redirects: int = MAX_REDIRECTS,
) -> Verdict:
    """Ask `url` what it is, following at most `max_redirects` redirects, within `deadline_s`.

    `client` must not follow redirects itself (`create_input_client`). Only programming
    errors raise.
    """
    try:
        request = client.build_request("HEAD", url, timeout=deadline_s)
        # The one clock for the whole check; httpx's per-operation timers are only a backstop.
        async with asyncio.timeout(deadline_s):
            return await _follow(client, request, max_bytes, max_redirects, deadline_s)
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:  # TimeoutError is an OSError
        return _failure(exc, deadline_s)


async def _follow(
    client: httpx.AsyncClient,
    request: httpx.Request,
    max_bytes: int,
    max_redirects: int,
    deadline_s: float,
) -> Verdict:
    """Send `request`, then each redirect or the one-byte GET it leads to, until a verdict."""
    redirects = 0
    while True:
        response = await client.send(request, stream=True)
        # Closed unread: a body (a redirect's, a GET that ignored the Range) is never drained.
        await response.aclose()
        status = response.status_code
        if response.next_request is not None:  # a 3xx with a Location
            redirects += 1
            if redirects > max_redirects:
                return InputRefused(
                    "input_unreachable", f"video_url redirects more than {max_redirects} times"
                )
            request = response.next_request
        elif request.method == "HEAD" and status in _HEAD_REFUSED:
            request = client.build_request(
                "GET", request.url, headers={"Range": "bytes=0-0"}, timeout=deadline_s
            )
        else:
            return _verdict(response, max_bytes)


def _verdict(response: httpx.Response, max_bytes: int) -> Verdict:
    """Judge the final answer: its status, then its type, then its stated size."""
    status = response.status_code
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return InputRetry(f"video_url answered HTTP {status}", retry_after)
    if not 200 <= status < 300:
        return InputRefused("input_unreachable", f"video_url answered HTTP {status}")
    media_type = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    is_video = media_type.startswith("video/") and len(media_type) > len("video/")
    if not is_video and media_type != "application/octet-stream":
        stated = f"of type {media_type}" if media_type else "of no stated type"
        return InputRefused("input_not_video", f"video_url is {stated}, not a video")
    size = _stated_size(response)
    if size is not None and size > max_bytes:
        return InputRefused(
            "input_too_large", f"video_url is {size} bytes; at most {max_bytes} are accepted"
        )
    return InputOk(content_type=media_type, size=size)


def _stated_size(response: httpx.Response) -> int | None:
    """The whole input's size: `Content-Range`'s total, else (not for a 206) `Content-Length`."""
    ranged = _CONTENT_RANGE_TOTAL.fullmatch(response.headers.get("Content-Range", "").strip())
    if ranged is not None:
        return int(ranged[1])
    length = response.headers.get("Content-Length", "").strip()
    if response.status_code == 206 or not length.isdigit():
        return None  # a part's length says nothing of the whole
    return int(length)


def _failure(exc: BaseException, deadline_s: float) -> Verdict:
    """Read a network failure: a timeout is worth another try, the rest is not."""
    match error_class(exc):
        case "timeout":
            return InputRetry(f"video_url did not answer within {deadline_s:g} s")
        case "forbidden_address":
            message = (
                "video_url (or a redirect from it) leads to an address the gateway may not reach"
            )
        case "invalid_url":
            message = (
                "video_url (or a redirect from it) is not an http(s) URL the gateway can fetch"
            )
        case "tls_error":
            message = "video_url's TLS handshake or certificate check failed"
        case "connect_error":
            message = "could not connect to video_url's host"
        case _:
            message = f"the connection to video_url's host broke ({type(exc).__name__})"
    return InputRefused("input_unreachable", message)
