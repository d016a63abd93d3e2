"""`POST /v1/jobs` without the framework's per-request work, for requests that need none of it.

Litestar's routing, request object, dependency and parameter parsing, response
object and exception layer cost more CPU per submit than everything the submit
itself does. `SubmitLane` sits in front of the app and answers a submit that is
plainly well formed (each header it reads at most once, JSON or no Content-Type,
a valid API key, Idempotency-Key and body) with the functions the route handler
uses, and sends the job as the handler would, header for header.

Anything else it passes on to the app untouched, handing back the body it
read, so every error of the contract keeps coming from one place: the route,
its parameters and `problems.py`. The errors that can only come once the job
went to the store (429, 409, Redis down) are answered here, by the app's own
exception handlers.
"""

from __future__ import annotations

import re
from typing import Any, Final, cast

import msgspec
from litestar import Litestar, Request
from litestar.enums import ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, HTTPScope, Receive, ReceiveMessage, Scope, Send

from service.api.auth import Caller, authenticate
from service.api.routes import Services, accept_job
from service.api.validation import MAX_IDEMPOTENCY_KEY_CHARS, parse_job_request
from service.models import JobRequest

SUBMIT_PATH: Final = "/v1/jobs"

_READ: Final = frozenset(
    {b"authorization", b"content-type", b"content-length", b"idempotency-key", b"host"}
)
"""The headers a submit depends on: the lane answers only when each comes at most once."""

_HOST = re.compile(rb"[A-Za-z0-9.:\[\]-]+")
"""Plain host names and addresses: a subset of what Litestar accepts (it answers 400 else)."""

_encoder = msgspec.json.Encoder()


class SubmitLane:
    """Answers plain `POST /v1/jobs` requests itself; passes everything else on to `app`."""

    def __init__(self, app: ASGIApp, litestar: Litestar, *, max_body_bytes: int) -> None:
        skipped = _skipped_by_the_lane(litestar, max_body_bytes)
        if skipped:
            raise RuntimeError(
                f"the submit lane (lane.py) would skip {', '.join(skipped)} configured for "
                f"POST {SUBMIT_PATH}: teach it to do the same, or take it out"
            )
        self.app = app
        self._litestar = litestar
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a plain submit, or let the app answer the request."""
        headers = None
        if scope["type"] == ScopeType.HTTP and scope["path"] == SUBMIT_PATH:
            headers = self._plain_headers(scope) if scope["method"] == "POST" else None
        if headers is None:
            await self.app(scope, receive, send)
            return
        read: list[ReceiveMessage] = []
        body = await self._read_body(receive, read)
        services: Services = self._litestar.state.services
        accepted = None if body is None else _accept(services, headers, body)
        if accepted is None:
            await self.app(scope, _replay(read, receive), send)
            return
        caller, job_request = accepted
        key = headers.get(b"idempotency-key")
        scope["path_template"] = SUBMIT_PATH  # as the router sets it: the metrics' route label
        try:
            job, status = await accept_job(
                services, caller, job_request, key.decode("latin-1") if key else None
            )
        except Exception as exc:  # noqa: BLE001 - answered by the app's handlers, as for the route
            await self._answer_error(scope, receive, send, exc)
            return
        content = _encoder.encode(job)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"location", f"{SUBMIT_PATH}/{job.id}".encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content, "more_body": False})

    def _plain_headers(self, scope: HTTPScope) -> dict[bytes, bytes] | None:
        """The headers a submit reads, or None unless each is there once and plainly valid."""
        found: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _READ:
                if name in found:
                    return None
                found[name] = value
        content_type = found.get(b"content-type")
        if content_type is not None and content_type != b"application/json":
            return None
        key = found.get(b"idempotency-key")  # latin-1: a byte is a character
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            return None
        length = found.get(b"content-length")
        if length is not None and not (length.isdigit() and int(length) <= self._max_body_bytes):
            return None
        host = found.get(b"host")
        if host is not None and not _HOST.fullmatch(host):
            return None
        return found

    async def _read_body(self, receive: Receive, read: list[ReceiveMessage]) -> bytes | None:
        """The body, noting each message in `read`; None if it is too large or cut short."""
        size = 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                return None
            size += len(message.get("body", b""))
            if size > self._max_body_bytes:
                return None
            if not message.get("more_body", False):
                if len(read) == 1:
                    return message.get("body", b"")
                return b"".join(cast("bytes", m.get("body", b"")) for m in read)

    async def _answer_error(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception
    ) -> None:
        """Answer `exc` as the app's exception handlers answer it for the route."""
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        handlers = self._litestar.exception_handlers
        handler = next(handlers[kind] for kind in type(exc).__mro__ if kind in handlers)
        response = handler(request, exc)
        await response.to_asgi_response(app=None, request=request)(scope, receive, send)


def _skipped_by_the_lane(app: Litestar, max_body_bytes: int) -> list[str]:
    """What the framework is configured to do for a submit that the lane does not do."""
    handler = cast("HTTPRouteHandler", app.route_handler_method_map[SUBMIT_PATH]["POST"])
    sent = [h for h in handler.resolve_response_headers() if not h.documentation_only]
    configured = {
        "middleware": handler.resolve_middleware(),
        "guards": handler.resolve_guards(),
        "before_request": handler.resolve_before_request(),
        "after_request": [x for x in handler.ownership_layers if getattr(x, "after_request", None)],
        "after_response": handler.resolve_after_response(),
        "response cookies": handler.resolve_response_cookies(),
        "response headers": sent,
        "before_send": app.before_send,
        "after_exception": app.after_exception,
        "CORS": app.cors_config,
        "compression": app.compression_config,
        "CSRF": app.csrf_config,
        "allowed hosts": app.allowed_hosts,
        "another body limit": handler.resolve_request_max_body_size() != max_body_bytes,
        "other exception handlers": handler.resolve_exception_handlers() != app.exception_handlers,
    }
    return [name for name, value in configured.items() if value]


def _accept(
    services: Services, headers: dict[bytes, bytes], body: bytes
) -> tuple[Caller, JobRequest] | None:
    """The caller and their valid request, or None where the route answers an error."""
    authorization = headers.get(b"authorization")
    try:
        caller = authenticate(
            services.settings.tenants,
            authorization.decode("latin-1") if authorization is not None else None,
        )
        return caller, parse_job_request(body, callback_hosts=caller.tenant.callback_hosts)
    except Exception:  # noqa: BLE001 - the route meets it again, and answers (and logs) it
        return None


def _replay(read: list[ReceiveMessage], receive: Receive) -> Receive:
    """A `receive` that gives the messages already read again, then the rest."""
    pending = list(read)

    async def replayed() -> ReceiveMessage:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
