"""The webhook and input clients' transport: httpx on an httpcore pool that dials through the guard.

httpx 0.28's `AsyncHTTPTransport` takes no network backend (encode/httpx#3749 is still
open), so this is the same thin adapter built from public APIs only: an httpx request
becomes an httpcore request on an `httpcore.AsyncConnectionPool` whose network backend is
`GuardedNetworkBackend`, and httpcore's exceptions become httpx's, most specific first, as
httpx's own transport maps them. The pool keeps connections alive per origin, so one
receiver answering many deliveries pays for TCP and TLS once.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Final

import httpcore
import httpx

from service.outbound import USER_AGENT, cookieless_jar
from service.webhooks.guard import AddressPolicy, GuardedNetworkBackend, Resolver

__all__ = ["GuardedTransport", "create_guarded_client"]

# Subclasses before their bases: the first match is the most specific.
_EXCEPTIONS: Final[tuple[tuple[type[Exception], type[httpx.TransportError]], ...]] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _httpx_exceptions() -> Iterator[None]:
    """Re-raise an httpcore exception as its httpx counterpart, keeping it as the cause."""
    try:
        yield
    except Exception as exc:
        for core, mapped in _EXCEPTIONS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _ResponseBody(httpx.AsyncByteStream):
    """An httpcore response body, read with httpx's exceptions."""

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_exceptions():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        """Give the connection back to the pool, or close it when the body was cut short."""
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            with _httpx_exceptions():
                await close()


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose connections are dialled by `GuardedNetworkBackend` (`policy`)."""

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        policy: AddressPolicy | None = None,
    ) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedNetworkBackend(resolver, policy=policy),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` on a pooled (or newly dialled, guarded) connection."""
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("GuardedTransport sends only async request bodies")
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_exceptions():
            response = await self._pool.handle_async_request(core_request)
        if not isinstance(response.stream, AsyncIterable):
            raise TypeError("an async pool answered with a sync body")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseBody(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()


def create_guarded_client(
    *,
    max_connections: int,
    policy: AddressPolicy | None = None,
    resolver: Resolver | None = None,
    verify: ssl.SSLContext | bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An httpx client on `GuardedTransport` that dials only what `policy` allows.

    Environment proxies are ignored, cookies never kept, redirects never followed by httpx
    (a caller that follows them checks each hop itself), and answers are not decompressed.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        transport=transport
        or GuardedTransport(limits=limits, resolver=resolver, verify=verify, policy=policy),
        trust_env=False,
        cookies=cookieless_jar(),
        follow_redirects=False,
        # Without decompression, ask for plain bytes so what is read stays readable.
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )
