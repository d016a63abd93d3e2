"""The Litestar app factory: `create_app(settings)` wires routes, problems, metrics and Redis.

Nothing is opened at import or at construction: the lifespan opens the Redis
client (lazily connecting, so the app starts while Redis is down and `/readyz`
says so) and builds the stores on `app.state.services`, and closes the client
at shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, cast

from litestar import Litestar
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send
from prometheus_client import Counter, Histogram

from service.api.admin import admin_router
from service.api.dashboard import dashboard_handlers
from service.api.openapi import serve_openapi
from service.api.problems import ProblemError, exception_handlers
from service.api.routes import Services, create_jobs, route_handlers
from service.api.validation import InvalidInputError, MalformedBodyError
from service.batching import Coalescer
from service.config import Settings
from service.logs import request_id_var
from service.metrics import ApiMetrics
from service.store.admin import AdminStore
from service.store.changes import JobChanges
from service.store.connection import REDIS_UNAVAILABLE, connect
from service.store.deliveries import DeliveryStore
from service.store.jobs import JobStore
from service.store.keys import Keys
from service.store.limits import Limits
from service.store.schedules import Schedules
from service.store.spend import SpendStore
from service.tenants_watch import TenantsWatcher

MAX_BODY_BYTES: Final = 1_000_000
"""A request body over 1 MB answers 413 (counted as sent, not as announced)."""


def create_app(settings: Settings, *, keys: Keys | None = None) -> Litestar:
    """The HTTP API for `settings`; `keys` gives tests a private Redis key prefix."""
    metrics = ApiMetrics()
    store_keys = keys if keys is not None else Keys()

    @asynccontextmanager
    async def open_redis(app: Litestar) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        retention = settings.job_retention_s
        jobs = JobStore(
            redis,
            store_keys,
            retention_s=retention,
            on_finish=metrics.job_finished,
            on_charge=metrics.job_charged,
        )
        limits = Limits(redis, store_keys)
        create_job = Coalescer(functools.partial(create_jobs, jobs))
        changes = JobChanges(redis, store_keys)
        app.state.stop_waiting = changes.stop
        app.state.services = Services(
            settings=settings,
            redis=redis,
            jobs=jobs,
            deliveries=DeliveryStore(redis, store_keys, retention_s=retention),
            schedules=Schedules(redis, store_keys, lease_s=settings.lease_s),
            limits=limits,
            metrics=metrics,
            create_job=create_job,
            spend=SpendStore(redis, store_keys),
            changes=changes,
            admin=AdminStore(redis, store_keys),
        )
        following = asyncio.create_task(changes.run())
        stop = asyncio.Event()
        watching: asyncio.Task[None] | None = None
        if settings.tenants_file:
            watcher = TenantsWatcher(
                settings.tenants,
                settings.tenants_file,
                on_result=metrics.tenants_reloaded,
                budgets_allowed=settings.price_micros > 0,
            )
            watcher.install_sighup()
            watching = asyncio.create_task(watcher.run(stop))
        try:
            yield
        finally:
            stop.set()
            if watching is not None:
                await watching
            changes.close()
            await following
            await create_job.aclose()
            await redis.aclose()

    app = Litestar(
        route_handlers=[*route_handlers(), admin_router(), *dashboard_handlers(), serve_openapi],
        lifespan=[open_redis],
        # `stop_waiting` is what the server calls at SIGTERM: waits answer, streams end.
        state=State({"settings": settings, "metrics": metrics, "stop_waiting": _nothing}),
        exception_handlers=exception_handlers(),
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=None,  # the document is built by service.api.openapi and served as is
        logging_config=None,  # the process configures logging (cli.py), not the framework
        debug=False,
    )
    # Around Litestar's whole handler (as its own CORS and OpenTelemetry wrappers sit), not
    # as route middleware: that would put a second exception layer into every request, and
    # requests that match no route are counted here too.
    app.asgi_handler = RequestMetrics(app.asgi_handler, metrics)
    return app


def _nothing() -> None:
    """No waiters before the lifespan opened the subscription."""


class RequestMetrics:
    """Counts every request by route template, method and status, with its latency.

    It also gives each request its id: the caller's `X-Request-Id` when it is a
    sane token, else a new one; it is echoed in the answer and carried by every
    log line written while answering.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled series, looked up once each: `labels()` takes a lock and builds a key.
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._new_ids = _RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request and note the status of its answer."""
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        request_id = _request_id(scope) or self._new_ids.next()
        request_id_var.set(request_id)
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Litestar's exception handlers answer first; this is only what escaped them.
            status = _status_of(exc)
            raise
        finally:
            route = scope.get("path_template") or "unmatched"
            key = (route, scope["method"], status)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = self._labelled(*key)
            count, latency = series
            count.inc()
            latency.observe(time.perf_counter() - started)

    def _labelled(self, route: str, method: str, status: int) -> tuple[Counter, Histogram]:
        requests = self.metrics.requests.labels(route=route, method=method, status=str(status))
        return requests, self.metrics.latency.labels(route=route, method=method)


class _RequestIds:
    """New request ids: 32 hex digits, a random half per process and a counter.

    As unique as `uuid4().hex` where it matters (across processes and restarts),
    without a system call per request.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def next(self) -> str:
        """The next id."""
        return f"{self._prefix}{next(self._count) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def _status_of(exc: Exception) -> int:
    if isinstance(exc, ProblemError):
        return exc.status
    if isinstance(exc, MalformedBodyError):
        return 400
    if isinstance(exc, InvalidInputError):
        return 422
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, REDIS_UNAVAILABLE):
        return 503
    return 500


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _request_id(scope: Scope) -> str | None:
    """The caller's X-Request-Id if it is a sane token (never trusted blindly), else None."""
    for name, value in cast("HTTPScope", scope)["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
    return None
