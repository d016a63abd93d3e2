"""Serving the API with uvicorn: the `api` command, and an in-loop server for `dev`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn

from service.api.app import create_app
from service.config import Settings
from service.serving import freeze_what_startup_made
from service.store.keys import Keys


def _config(settings: Settings, host: str, port: int, keys: Keys | None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings, keys=keys),
        host=host,
        port=port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
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
    uvicorn.Server(config).run()


class EmbeddedServer(uvicorn.Server):
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
