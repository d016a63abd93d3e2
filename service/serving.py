"""Serving a small Litestar app with uvicorn inside an event loop that is already running.

The emulator, the worker's health and metrics port and dev's webhook receiver
each run beside other work in one process, so none of them may own the
process's signals or event loop. `listen` binds the port first, so a port that
is taken fails right there with an `OSError` the caller can put in one line,
before anything else has started; `serve` then answers on that socket until
`Served.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import Iterator

import uvicorn
from litestar.types import ASGIApp

__all__ = ["Served", "freeze_what_startup_made", "listen", "reachable_url", "serve"]


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host`:`port` (port 0: any free one); raises OSError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEADDR (set by create_server on POSIX) lets a restarted process rebind at once.
    return socket.create_server((host, port), family=family, backlog=2048)


def reachable_url(sock: socket.socket) -> str:
    """The base URL a local client uses to reach a listening socket (wildcards become loopback)."""
    host, port = sock.getsockname()[:2]
    if host == "0.0.0.0":  # noqa: S104 - recognising, not binding, the wildcard
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def freeze_what_startup_made() -> None:
    """Move every object alive now out of the garbage collector's sight, for a serving process.

    The app (routes, signature models, encoders), the settings and every imported
    module live as long as the process. Left to the collector, each full collection
    walks all of them, a pause of every request in flight (`make bench`, A2's p99);
    frozen, a collection walks only what requests made. Garbage is collected first,
    so none of it is frozen.
    """
    gc.collect()
    gc.freeze()


class _InLoopServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host process and says when it is up."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Capture nothing: the process around it decides when to stop."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, then tell `serve` that requests are being answered."""
        await super().startup(sockets)
        self.up.set()


class Served:
    """An app being served; `stop` closes the port and waits for answers in progress."""

    def __init__(self, server: _InLoopServer, task: asyncio.Task[None], url: str) -> None:
        self._server = server
        self._task = task
        self.url = url

    async def stop(self) -> None:
        """Stop accepting, finish the requests in hand, and return once the port is closed."""
        self._server.should_exit = True
        await self._task


async def serve(
    app: ASGIApp,
    sock: socket.socket,
    *,
    keep_alive_s: int = 5,
    shutdown_s: float = 2.0,
) -> Served:
    """Answer requests to `app` on `sock` in the running loop until `Served.stop`."""
    config = uvicorn.Config(
        app,
        http="auto",  # httptools when installed
        lifespan="off",  # these apps open nothing at startup
        access_log=False,
        log_config=None,  # the process configures logging
        # uvicorn's start and stop lines (INFO, on `uvicorn.error`) would say nothing the
        # process does not say itself; its warnings and errors still show.
        log_level=logging.WARNING,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=keep_alive_s,
        timeout_graceful_shutdown=max(1, round(shutdown_s)),
    )
    server = _InLoopServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    up = asyncio.create_task(server.up.wait())
    await asyncio.wait({task, up}, return_when=asyncio.FIRST_COMPLETED)
    if not server.up.is_set():
        up.cancel()
        sock.close()
        await task  # raises what stopped it
        raise RuntimeError("the server stopped before it started")
    return Served(server, task, reachable_url(sock))
