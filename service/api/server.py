"""Serving the API with uvicorn: the `api` command, and an in-loop server for `dev`.

uvicorn bounds neither how large a request head may be with httptools (h11's
`h11_max_incomplete_event_size` applies to the pure-Python h11 parser only, several
times slower) nor how long a client may take to send it (`timeout_keep_alive`
covers the idle gap between requests; every byte received cancels it). Left so, one
client can make the API buffer a 1 MB header, or hold thousands of connections by
never finishing their heads. `BoundedHeadProtocol` adds both bounds to uvicorn's
httptools protocol; the ingress enforces the same ones in front (deploy/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from http import HTTPStatus
from types import FrameType

import msgspec
import uvicorn
from litestar import Litestar
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.api.app import create_app
from service.api.problems import PROBLEM_JSON, TYPE_PREFIX
from service.config import Settings
from service.models import Problem
from service.serving import freeze_what_startup_made
from service.store.keys import Keys

MAX_HEAD_BYTES = 32 * 1024
"""A request head (request line and header fields) larger than this answers 431."""
MAX_HEADER_FIELDS = 100
"""A request head with more header fields than this answers 431."""
HEAD_TIMEOUT_S = 5.0
"""A connection that has not sent a whole request head this long is answered 408 and closed."""

HEAD_TOO_LARGE = (
    f"the request head must be at most {MAX_HEAD_BYTES} bytes "
    f"with at most {MAX_HEADER_FIELDS} header fields"
)
_KINDS = {408: "request-timeout", 431: "header-fields-too-large"}
_problems = msgspec.json.Encoder()

log = logging.getLogger(__name__)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a size, a field count and a deadline for each head.

    The deadline starts when the connection is made (the first request) or when the
    first byte of a request arrives (the next ones on a kept-alive connection), and is
    disarmed once the head is complete: a long response or a slow body is not bound by
    it. Bytes are counted while the head is incomplete, so an unfinished head never
    takes more than about `MAX_HEAD_BYTES` plus one read; a head that arrives whole in
    one read is measured when it is complete.
    """

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        """Serve the connection, and give it `HEAD_TIMEOUT_S` to send its first head."""
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the head deadline with the connection."""
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse, then refuse a head that is still incomplete and already too large."""
        if self._refused:
            return
        reading_head = self._head_timer is not None
        super().data_received(data)
        if reading_head and self._head_timer is not None and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        """A request begins: on a kept-alive connection its head gets its own deadline."""
        super().on_message_begin()
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        """The head is whole: disarm its deadline, and refuse it when it is too large."""
        self._disarm_head_timer()
        if self._refused:
            return
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADER_FIELDS:
            self._refuse(431, HEAD_TOO_LARGE)
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        """Pass the body on, unless its head was refused (no request was started)."""
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """End the request, unless its head was refused."""
        if not self._refused:
            super().on_message_complete()

    def _arm_head_timer(self) -> None:
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, f"the request head did not arrive within {HEAD_TIMEOUT_S:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a `status` problem, then close: nothing of this request reaches the app."""
        self._refused = True
        self._disarm_head_timer()
        log.debug("refused a request from %s: %s", self.client, detail)
        if self.cycle is not None and not self.cycle.response_complete:
            # A head pipelined behind a response still being sent: an answer now would
            # cut into that response, so let it finish and close the connection after it.
            self.cycle.keep_alive = False
            return
        if self.transport.is_closing():
            return
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        body = _problems.encode(
            Problem(
                type=TYPE_PREFIX + _KINDS[status],
                title=HTTPStatus(status).phrase,
                status=status,
                detail=detail,
            )
        )
        content.extend(
            [
                b"content-type: " + PROBLEM_JSON.encode() + b"\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


class ApiServer(uvicorn.Server):
    """uvicorn's server, which also tells waiters and event streams to end at SIGTERM.

    uvicorn drains in-flight requests for `GATEWAY_SHUTDOWN_S`; a wait of up to
    60 s or an endless stream would run into that limit and be cut. Told at the
    signal, a wait answers the job as it stands and a stream closes.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Stop as uvicorn does, and wake every waiter of the app."""
        super().handle_exit(sig, frame)
        app = self.config.app
        if isinstance(app, Litestar):
            # A signal handler runs between two steps of the loop: schedule, do not call.
            asyncio.get_running_loop().call_soon_threadsafe(app.state.stop_waiting)


def _config(settings: Settings, host: str, port: int, keys: Keys | None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings, keys=keys),
        host=host,
        port=port,
        loop="auto",  # uvloop when installed
        http=BoundedHeadProtocol,  # httptools, with bounds on request heads (module docstring)
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        # SIGTERM: stop accepting, let in-flight requests finish, then exit.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_s)),
        timeout_keep_alive=30,
        log_config=None,
    )


def serve_api(settings: Settings, *, host: str, port: int) -> None:
    """The `api` command: serve until SIGTERM or SIGINT, draining in-flight requests."""
    run_server(_config(settings, host, port, None))


def run_server(config: uvicorn.Config) -> None:
    """Serve `config`'s app in this process, with what lives for good out of the GC's sight."""
    config.load()  # the app wrapped, the server's protocol classes imported
    freeze_what_startup_made()
    ApiServer(config).run()


class EmbeddedServer(ApiServer):
    """A uvicorn server that leaves signals to its host process (`dev` handles Ctrl-C)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Capture nothing: the embedding process decides when to stop."""
        yield


def embedded_api(
    settings: Settings, *, host: str, port: int, keys: Keys | None = None
) -> EmbeddedServer:
    """An API server to run inside an existing event loop with `await server.serve()`."""
    return EmbeddedServer(_config(settings, host, port, keys))
