"""The HTTP API's `/v1` routes and probes: thin handlers from a request to the store and back.

Every `/v1` handler gets the authenticated `Caller` and the `Services` the
app's lifespan opened; it checks what the contract asks, calls the store, and
answers a Struct from `models.py`. Errors are raised as problems (`problems.py`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Final

import msgspec
import redis.asyncio as aioredis
from litestar import HttpMethod, Request, Response, Router, get, post, route
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency, Provide
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent
from litestar.types import ControllerRouterHandler
from redis.exceptions import RedisError

from service.api.auth import Caller, authenticate
from service.api.problems import RETRY_AFTER_S, ProblemError, problem_responses
from service.api.usage import MAX_USAGE_DAYS, budget_remaining, usage_of, usage_range
from service.api.validation import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    InvalidInputError,
    idempotency_key_hash,
    parse_job_request,
    request_digest,
)
from service.api.watching import (
    MAX_WAIT_S,
    job_events,
    preference_applied,
    preferred_wait_s,
    until_final,
)
from service.batching import Coalescer
from service.config import Settings, Tenant
from service.metrics import PROMETHEUS_MEDIA_TYPE, ApiMetrics
from service.models import (
    DeliveryLog,
    FieldError,
    Job,
    JobList,
    JobRecord,
    JobRequest,
    JobStatus,
    Probe,
    Recovering,
    RecoverRequest,
    UpstreamPauseInfo,
    Usage,
    usd,
    utcnow,
)
from service.store.admin import AdminStore
from service.store.changes import JobChanges
from service.store.connection import new_id
from service.store.deliveries import DeliveryStore, Resend
from service.store.jobs import Budgets, Created, JobStore, Outcome, StoredJob
from service.store.limits import Limits, Take
from service.store.schedules import Schedules
from service.store.spend import BudgetRefusal, SpendStore

log = logging.getLogger(__name__)

JOB_ID_PATTERN: Final = r"^job_[0-9A-HJKMNP-TV-Z]{26}$"
"""What `new_id("job_")` makes: the prefix and 26 Crockford base32 characters."""
_JOB_ID = re.compile(JOB_ID_PATTERN)

CANCEL_TRIES: Final = 5
"""How often a cancel re-reads and decides again when a worker changed the job meanwhile."""

READY_TIMEOUT_S: Final = 1.0
"""`/readyz` and `/metrics` wait this long for Redis: a probe must answer quickly."""


NewJob = tuple[JobRecord, tuple[str, str] | None, Take | None, Budgets]
"""A job to create, its `(key hash, body digest)` if idempotent, its tenant's rate limit
and `(day, month)` budgets."""


@dataclass(frozen=True)
class Services:
    """What the handlers use; the app's lifespan opens it and puts it on `app.state`.

    `create_job` is `JobStore.create` within the tenant's rate limit, with concurrent
    submits' calls coalesced into one script call.
    """

    settings: Settings
    redis: aioredis.Redis
    jobs: JobStore
    deliveries: DeliveryStore
    schedules: Schedules
    limits: Limits
    metrics: ApiMetrics
    create_job: Coalescer[NewJob, Created]
    spend: SpendStore
    changes: JobChanges
    admin: AdminStore


def provide_services(request: Request[Any, Any, Any]) -> Services:
    """The `services` dependency of the probes: what the lifespan opened."""
    services: Services = request.app.state.services
    return services


@dataclass(frozen=True, slots=True)
class Call:
    """An authenticated `/v1` call: who makes it, and the services that answer it.

    One dependency rather than two: Litestar resolves two dependencies of a
    handler concurrently in an anyio task group, which cost more CPU per
    request than everything the submit handler itself did.
    """

    caller: Caller
    services: Services


def provide_call(request: Request[Any, Any, Any]) -> Call:
    """The `call` dependency of every `/v1` handler: authenticates the request (401 if not)."""
    services: Services = request.app.state.services
    caller = authenticate(services.settings.tenants, request.headers.get("authorization"))
    return Call(caller=caller, services=services)


JobId = Annotated[str, PathParameter(description="The job's id, as answered by `POST /v1/jobs`.")]
StatusFilter = Annotated[
    JobStatus | None, QueryParameter(description="Only jobs with this status.")
]
PageLimit = Annotated[int, QueryParameter(ge=1, le=100, description="Jobs per page.")]
PageCursor = Annotated[
    str | None,
    QueryParameter(
        pattern=JOB_ID_PATTERN,
        description="`next_cursor` of the previous page; omit for the first page.",
    ),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        description=(
            "Makes the submit safe to retry: per tenant, kept for the retention period. "
            "The same key with the same body answers 200 with the same job; with another "
            "body, 409."
        ),
    ),
]
Prefer = Annotated[
    str | None,
    HeaderParameter(
        name="Prefer",
        description=(
            f"`wait=N` (RFC 7240; 1 ≤ N ≤ {MAX_WAIT_S}, `wait` alone means {MAX_WAIT_S}): "
            "hold the answer until the job is final or N seconds have passed, then answer "
            "the job as it stands, with `Preference-Applied: wait=N`. An invalid value is "
            "ignored."
        ),
    ),
]
LastEventId = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID",
        description="The `id` of the last event received: only newer events are sent.",
    ),
]
_PREFERENCE_APPLIED = ResponseHeader(
    name="Preference-Applied",
    description="`wait=N` when the request's `Prefer: wait` was honoured.",
    documentation_only=True,
)
_LOCATION = [
    ResponseHeader(
        name="Location", description="`/v1/jobs/{id}` of the job.", documentation_only=True
    ),
    _PREFERENCE_APPLIED,
]


@post(
    "/jobs",
    status_code=202,
    summary="Submit a job",
    description=(
        "Validates the request (every offending field is named in one 422), stores the job "
        "as `pending` and queues it for RunComfy. Nothing is sent upstream for invalid input. "
        "With `Prefer: wait=N` the answer waits up to N seconds for the job to be final."
    ),
    response_headers=_LOCATION,
    responses={
        200: ResponseSpec(
            data_container=Job,
            description="A replay of an Idempotency-Key with the same body: the same job.",
            generate_examples=False,
        ),
        **problem_responses(
            400,
            401,
            402,
            409,
            413,
            415,
            422,
            429,
            503,
            s409="This Idempotency-Key was used with another body.",
        ),
    },
)
async def submit_job(
    request: Request[Any, Any, Any],
    call: NamedDependency[Call],
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> Response[Job]:
    """Validate and store a new job, or answer the one an Idempotency-Key names."""
    caller, services = call.caller, call.services
    _require_json(request)
    body = await request.body()
    job_request = parse_job_request(
        body,
        callback_hosts=caller.tenant.callback_hosts,
        input_hosts=services.settings.preflight_allow_hosts,
    )
    job, status = await accept_job(services, caller, job_request, idempotency_key)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    wait_s = preferred_wait_s(prefer)
    if wait_s is not None:
        stored = await _owned_job(services.jobs, caller, job.id)
        job = _view(await until_final(services.changes, services.jobs, stored, wait_s))
        headers |= preference_applied(wait_s)
    return Response(job, status_code=status, headers=headers)


async def accept_job(
    services: Services, caller: Caller, job_request: JobRequest, idempotency_key: str | None
) -> tuple[Job, int]:
    """Store a valid job request: the new job and 202, or the one its key names and 200.

    What `submit_job` does once the request is read and valid. Raises the 409 and 429
    problems (and Redis's errors) for the route to answer.
    """
    record = _new_record(job_request, caller, services.settings)
    idempotency = None
    if idempotency_key is not None:
        idempotency = (idempotency_key_hash(idempotency_key), request_digest(job_request))
    tenant = caller.tenant
    budgets = (tenant.budget_micros_per_day, tenant.budget_micros_per_month)
    created = await services.create_job((record, idempotency, _submission_limit(tenant), budgets))
    if created.over_budget is not None:
        raise _over_budget(created.over_budget)
    if created.retry_after_s > 0:
        raise ProblemError(
            429,
            f"this tenant may submit {caller.tenant.rate_per_s:g} jobs per second; retry later",
            headers={"Retry-After": str(max(1, math.ceil(created.retry_after_s)))},
        )
    if created.created:
        services.metrics.jobs_accepted.labels(tenant=caller.tenant.id).inc()
        return record.view("pending", 0), 202
    if not created.same_body:
        raise ProblemError(
            409,
            "this Idempotency-Key was already used with a different request body",
            kind="idempotency-conflict",
        )
    stored = await services.jobs.get(created.job_id)
    if stored is None:
        raise ProblemError(
            409,
            "this Idempotency-Key names a job that no longer exists",
            kind="idempotency-conflict",
        )
    return _view(stored), 200


@get(
    "/jobs/{job_id:str}",
    summary="Get a job",
    description="With `Prefer: wait=N` the answer waits up to N seconds for the job to be final.",
    response_headers=[_PREFERENCE_APPLIED],
    responses=problem_responses(401, 404, 503),
)
async def get_job(
    job_id: JobId, call: NamedDependency[Call], prefer: Prefer = None
) -> Response[Job]:
    """The job, if it is the caller's; when asked, once final or after a wait."""
    caller, services = call.caller, call.services
    stored = await _owned_job(services.jobs, caller, job_id)
    wait_s = preferred_wait_s(prefer)
    if wait_s is None:
        return Response(_view(stored))
    stored = await until_final(services.changes, services.jobs, stored, wait_s)
    return Response(_view(stored), headers=preference_applied(wait_s))


@get(
    "/jobs/{job_id:str}/events",
    summary="Follow a job's events",
    description=(
        "A `text/event-stream`: first the job as it stands, then one event per status change "
        "(`event: job.<status>`, `id: <n>` increasing, `data:` the job as one line of JSON), "
        "a `: keep-alive` comment at least every 15 s; it ends after the final event. "
        "`Last-Event-ID: <n>` resumes with newer events only; a final job answers its final "
        "event and ends."
    ),
    media_type="text/event-stream",
    responses=problem_responses(401, 404, 503),
)
async def follow_job(
    job_id: JobId, call: NamedDependency[Call], last_event_id: LastEventId = None
) -> ServerSentEvent:
    """The job's events, if it is the caller's (a 404 problem otherwise, not a stream)."""
    caller, services = call.caller, call.services
    stored = await _owned_job(services.jobs, caller, job_id)
    return job_events(services.changes, services.jobs, stored, last_event_id)


@post(
    "/jobs/{job_id:str}/cancel",
    status_code=200,
    summary="Cancel a job",
    description=(
        "`pending`: cancelled at once (200). `in_queue`: RunComfy is asked to cancel (202); "
        "the job becomes `cancelled`, or carries on if RunComfy answers `not_cancellable`. "
        "`in_progress` or final: 409."
    ),
    responses={
        202: ResponseSpec(
            data_container=Job,
            description="The upstream cancel is under way.",
            generate_examples=False,
        ),
        **problem_responses(
            401, 404, 409, 503, s409="The job is in_progress or final: it cannot be cancelled."
        ),
    },
)
async def cancel_job(job_id: JobId, call: NamedDependency[Call]) -> Response[Job]:
    """Cancel a pending job now, or ask RunComfy to cancel a queued one."""
    jobs = call.services.jobs
    return await cancel(jobs, lambda: _owned_job(jobs, call.caller, job_id))


ReadJob = Callable[[], Awaitable[StoredJob]]
"""Reads the job a call is about, raising its 404 when the caller may not see it."""


async def cancel(jobs: JobStore, read: ReadJob) -> Response[Job]:
    """Cancel the job `read` reads: the answer of `POST /v1/jobs/{id}/cancel` (and the admin's)."""
    for _ in range(CANCEL_TRIES):
        stored = await read()
        status = stored.record.status
        if status == "pending":
            outcome, answer = await jobs.finish(stored, "cancelled", lease=None), 200
        elif status == "in_queue":
            if stored.record.cancel_requested_at is not None:
                return Response(_view(stored), status_code=202)
            outcome, answer = await jobs.cancel_requested(stored), 202
        else:
            raise ProblemError(409, _not_cancellable(status), kind="not-cancellable")
        if outcome is Outcome.DONE:
            return Response(_view(await read()), status_code=answer)
        # STALE: a worker changed the job since it was read; read again and decide again.
    raise ProblemError(
        503,
        "the job kept changing while it was being cancelled; retry",
        headers={"Retry-After": "1"},
    )


@get(
    "/jobs",
    summary="List jobs",
    description="The caller's jobs, newest first, a page at a time.",
    responses=problem_responses(401, 422, 503),
)
async def list_jobs(
    call: NamedDependency[Call],
    status: StatusFilter = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> JobList:
    """A page of the caller's jobs, newest first."""
    caller, services = call.caller, call.services
    page, next_cursor = await services.jobs.page(
        caller.tenant.id, status=status, limit=limit, cursor=cursor
    )
    return JobList(items=[_view(stored) for stored in page], next_cursor=next_cursor)


@get(
    "/jobs/{job_id:str}/deliveries",
    summary="The webhook attempt log",
    description="Every delivery attempt of the job's final event, oldest first.",
    responses=problem_responses(401, 404, 503),
)
async def list_deliveries(job_id: JobId, call: NamedDependency[Call]) -> DeliveryLog:
    """The attempt log of the job's final-event webhook (empty until it exists)."""
    caller, services = call.caller, call.services
    await _owned_job(services.jobs, caller, job_id)
    delivery_id = await services.deliveries.final_delivery_id(job_id)
    items = await services.deliveries.log(delivery_id) if delivery_id else []
    return DeliveryLog(items=items)


@post(
    "/jobs/{job_id:str}/deliveries",
    status_code=202,
    summary="Send the final webhook again",
    description=(
        "Queues the job's final event again, with the same `webhook-id`; answers the job, "
        "its `webhook.state` back to `pending`."
    ),
    responses=problem_responses(
        401,
        404,
        409,
        503,
        s404="No such job, or the job has no webhook for its final event.",
        s409="The job is not final yet.",
    ),
)
async def resend_delivery(job_id: JobId, call: NamedDependency[Call]) -> Job:
    """Queue the job's final event again."""
    jobs = call.services.jobs
    return await resend(call.services.deliveries, lambda: _owned_job(jobs, call.caller, job_id))


async def resend(deliveries: DeliveryStore, read: ReadJob) -> Job:
    """Queue the final event of the job `read` reads again; the job, or the problem why not."""
    stored = await read()
    if stored.record.webhook is None:
        raise ProblemError(404, "the job has no webhook", kind="no-webhook")
    outcome = await deliveries.resend(stored.record.id, stored.record.tenant)
    if outcome is Resend.NOT_FINAL:
        raise ProblemError(
            409, f"the job is {stored.record.status}, not final yet", kind="not-final"
        )
    if outcome is Resend.NO_WEBHOOK:
        raise ProblemError(
            404, "the job's final event is not one its webhook asked for", kind="no-webhook"
        )
    if outcome is Resend.GONE:
        raise ProblemError(404, "no such job")
    return _view(await read())


@post(
    "/deliveries/recover",
    status_code=202,
    summary="Send failed webhooks again",
    description=(
        "Queues again the final event of each of the caller's jobs whose webhook delivery "
        "`failed` and which finished in the window (`since` to `until`, RFC 3339, inclusive; "
        "no `until`: up to now), with the same `webhook-id`, paced like any other delivery. "
        "Each is queued once: a second call finds it no longer failed."
    ),
    responses=problem_responses(400, 401, 422, 503),
)
async def recover_deliveries(
    data: JSONBody[RecoverRequest], call: NamedDependency[Call]
) -> Recovering:
    """Queue the caller's failed final webhooks of jobs finished in the window again."""
    since_ms, until_ms = recovery_window(data)
    count = await call.services.deliveries.recover(
        call.caller.tenant.id, since_ms=since_ms, until_ms=until_ms
    )
    return Recovering(recovering=count)


def recovery_window(request: RecoverRequest) -> tuple[int, int | None]:
    """The window of a recovery, in ms since the epoch; a 422 when it is not one."""
    since = _time_of("since", request.since)
    until = None if request.until is None else _time_of("until", request.until)
    if until is not None and until < since:
        raise _invalid("until", "must not be before `since`")
    return _epoch_ms(since), None if until is None else _epoch_ms(until)


def _time_of(field: str, value: str) -> datetime:
    try:
        at = msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        at = None
    if at is None or at.tzinfo is None:
        raise _invalid(field, "must be an RFC 3339 time with a time zone offset")
    return at


def _epoch_ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _invalid(field: str, detail: str) -> InvalidInputError:
    return InvalidInputError([FieldError(pointer=f"#/{field}", detail=detail)])


@get(
    "/usage",
    summary="Spend by day, and budgets",
    description=(
        "The caller's jobs and spend per UTC day from `from` to `to` (inclusive, at most "
        f"{MAX_USAGE_DAYS} days; default: this month so far): a job counts in the day it was "
        "submitted. Amounts are null while the price is unknown. `budget` shows the tenant's "
        "budgets and what counts against them now."
    ),
    responses=problem_responses(401, 422, 503),
)
async def get_usage(
    call: NamedDependency[Call],
    first: Annotated[
        date | None, QueryParameter(name="from", description="First day, `YYYY-MM-DD` (UTC).")
    ] = None,
    last: Annotated[
        date | None, QueryParameter(name="to", description="Last day, `YYYY-MM-DD` (UTC).")
    ] = None,
) -> Usage:
    """The caller's usage by day and its budgets."""
    caller, services = call.caller, call.services
    first, last = usage_range(first, last, await services.spend.today())
    price_known = services.settings.price_micros > 0
    return await usage_of(services.spend, caller.tenant, first, last, price_known=price_known)


@get("/healthz", summary="Liveness", description="Answers while the process serves; no I/O.")
async def healthz() -> Probe:
    """Alive: the process answers HTTP."""
    return Probe(status="ok")


@get(
    "/readyz",
    summary="Readiness",
    description="Answers 200 while Redis answers a PING.",
    responses=problem_responses(503),
)
async def readyz(services: NamedDependency[Services]) -> Probe:
    """Ready when Redis answers a PING within a second."""
    try:
        await asyncio.wait_for(services.redis.ping(), READY_TIMEOUT_S)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("api: not ready: Redis does not answer (%s)", type(exc).__name__)
        raise ProblemError(
            503, "Redis does not answer", headers={"Retry-After": str(RETRY_AFTER_S)}
        ) from None
    # A pause (no funds, rate limited) does not make the API unready: it still
    # accepts jobs, which wait. It is reported so operators see why nothing moves.
    pause = await services.limits.upstream_pause()
    if pause is None:
        return Probe(status="ready")
    info = UpstreamPauseInfo(reason=pause.reason, remaining_s=round(pause.remaining_s, 1))
    return Probe(status="ready", upstream_pause=info)


@get(
    "/metrics",
    summary="Prometheus metrics",
    media_type="text/plain",  # what the document shows; the answer carries the full type
    description="Request counts and latency, jobs accepted by tenant, schedule depths.",
)
async def metrics(services: NamedDependency[Services]) -> Response[bytes]:
    """The API's metrics in Prometheus text format (schedule depths read now, best effort)."""
    try:
        depths = await asyncio.wait_for(services.schedules.depths(), READY_TIMEOUT_S)
        pause = await asyncio.wait_for(services.limits.upstream_pause(), READY_TIMEOUT_S)
    except (RedisError, OSError, TimeoutError):
        depths, pause = None, None  # the API's own counters are still worth scraping
    services.metrics.set_depths(depths)
    services.metrics.set_pause(pause.reason if pause else None)
    try:
        remaining = await asyncio.wait_for(
            budget_remaining(services.spend, services.settings.tenants), READY_TIMEOUT_S
        )
    except (RedisError, OSError, TimeoutError):
        remaining = None
    services.metrics.set_budget_remaining(remaining)
    return Response(services.metrics.render(), media_type=PROMETHEUS_MEDIA_TYPE)


def route_handlers() -> list[ControllerRouterHandler]:
    """The route tree: `/v1` (authenticated) and the probes, with their dependencies."""
    services = Provide(provide_services, sync_to_thread=False)
    jobs = [
        submit_job,
        get_job,
        follow_job,
        cancel_job,
        list_jobs,
        list_deliveries,
        resend_delivery,
        recover_deliveries,
        get_usage,
    ]
    v1 = Router(
        "/v1",
        route_handlers=[*options_handlers(jobs), *jobs],
        dependencies={
            "call": Provide(provide_call, sync_to_thread=False),
        },
        security=[{"apiKey": []}],
        tags=["jobs"],
    )
    probes = [healthz, readyz, metrics]
    operations = Router(
        "/",
        route_handlers=[*options_handlers(probes), *probes],
        dependencies={"services": services},
        tags=["operations"],
    )
    return [v1, operations]


def options_handlers(handlers: Sequence[HTTPRouteHandler]) -> list[HTTPRouteHandler]:
    """One OPTIONS handler per path, whose `Allow` names every method of that path.

    Litestar 2's own OPTIONS answer names only the methods of the first handler
    registered on a path (`OPTIONS /v1/jobs` said `Allow: OPTIONS, POST`;
    litestar#4169, fixed in Litestar 3), so the app brings its own. They must be
    registered before the others: a path that has an OPTIONS handler gets none of Litestar's.
    """
    methods: dict[str, set[str]] = {}
    for handler in handlers:
        for path in handler.paths:
            methods.setdefault(path, {"OPTIONS"}).update(handler.http_methods)
    return [_options_handler(path, ", ".join(sorted(allow))) for path, allow in methods.items()]


def _options_handler(path: str, allow: str) -> HTTPRouteHandler:
    def options() -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": allow})

    return route(
        path,
        http_method=HttpMethod.OPTIONS,
        status_code=204,
        include_in_schema=False,
        sync_to_thread=False,
    )(options)


def _submission_limit(tenant: Tenant) -> Take | None:
    """The tenant's `rate_per_s` on job submissions, as the limit each create takes from."""
    if tenant.rate_per_s is None:
        return None
    rate = tenant.rate_per_s
    # A second's worth of submissions may come at once; beyond that, one per 1/rate s.
    return Take(f"api-submit:{tenant.id}", rate, burst=max(1, math.ceil(rate)))


async def create_jobs(jobs: JobStore, items: list[NewJob]) -> list[Created]:
    """`JobStore.create_many` of what the `create_job` coalescer gathered."""
    return await jobs.create_many(
        [(record, idempotency) for record, idempotency, _, _ in items],
        limits=[limit for _, _, limit, _ in items],
        budgets=[budgets for _, _, _, budgets in items],
    )


def _over_budget(refusal: BudgetRefusal) -> ProblemError:
    """The 402 of a submit that would go over a budget, with that budget's figures."""
    return ProblemError(
        402,
        f"this job's estimate would take the tenant over its "
        f"{'daily' if refusal.period == 'day' else 'monthly'} budget of "
        f"{usd(refusal.budget_micros)} USD; it resets at {refusal.resets_at.isoformat()}",
        kind="budget-exceeded",
        extensions={
            "budget_usd": usd(refusal.budget_micros),
            "charged_usd": usd(refusal.charged_micros),
            "held_usd": usd(refusal.held_micros),
            "period": refusal.period,
            "resets_at": refusal.resets_at,
        },
    )


def _require_json(request: Request[Any, Any, Any]) -> None:
    """Refuse a body declared as something other than JSON (no Content-Type is fine)."""
    if "content-type" not in request.headers:
        return
    media_type, options = request.content_type
    media_type = media_type.lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ProblemError(
            415,
            f"send the body as application/json, not {media_type or 'an empty type'}",
            headers={"Accept-Post": "application/json"},
        )
    charset = options.get("charset", "utf-8").strip().lower()
    if charset not in {"utf-8", "utf8"}:  # RFC 8259: JSON between systems is UTF-8
        raise ProblemError(
            415,
            f"send the body as UTF-8 JSON, not {charset or 'an empty charset'}",
            headers={"Accept-Post": "application/json"},
        )


def _new_record(job_request: JobRequest, caller: Caller, settings: Settings) -> JobRecord:
    """The stored form of a new, pending job, with its estimate when the price is known."""
    now = utcnow()
    price = settings.price_micros
    return JobRecord(
        estimate_micros=price * (2 if job_request.input.pro_mode else 1) if price else None,
        id=new_id("job_"),
        tenant=caller.tenant.id,
        key_id=caller.key_id,
        input=job_request.input,
        webhook=job_request.webhook,
        metadata=job_request.metadata,
        created_at=now,
        deadline_at=now + timedelta(seconds=job_request.timeout_s or settings.job_timeout_s),
    )


async def _owned_job(jobs: JobStore, caller: Caller, job_id: str) -> StoredJob:
    """The job if it exists and is the caller's; otherwise the same 404 either way."""
    stored = None
    if _JOB_ID.match(job_id):  # anything else was never an id: no need to ask Redis
        stored = await jobs.get(job_id)
    if stored is None or stored.record.tenant != caller.tenant.id:
        raise ProblemError(404, "no such job")
    return stored


def _view(stored: StoredJob) -> Job:
    return stored.record.view(stored.webhook_state, stored.webhook_attempts)


def _not_cancellable(status: str) -> str:
    if status == "in_progress":
        return "the job is in_progress: RunComfy cannot cancel a running request"
    return f"the job is already {status}"
