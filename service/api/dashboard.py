"""The operators' dashboard at `/ui`: one static page, its script and its style sheet.

The files are package data (`service/api/ui/`), read once and served as they
are: no build step, nothing fetched from elsewhere (the Content-Security-Policy
allows this origin only). The page asks for an admin key once, keeps it in the
tab's sessionStorage, and talks to the JSON admin API (`admin.py`) with it.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Annotated, Final

from litestar import Response, get
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.params import PathParameter

_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("service.api.ui").joinpath(name).read_bytes()


def _file(name: str) -> Response[bytes]:
    return Response(_read(name), media_type=_FILES[name], headers=_HEADERS)


@get("/ui", include_in_schema=False, sync_to_thread=False)
def dashboard() -> Response[bytes]:
    """The dashboard page."""
    return _file("index.html")


@get("/ui/{name:str}", include_in_schema=False, sync_to_thread=False)
def dashboard_asset(name: Annotated[str, PathParameter()]) -> Response[bytes]:
    """The page's script and style sheet; anything else is a 404."""
    if name not in _FILES or name == "index.html":
        raise NotFoundException
    return _file(name)


def dashboard_handlers() -> list[HTTPRouteHandler]:
    """The dashboard's routes."""
    return [dashboard, dashboard_asset]
