"""The operators' API under `/v1/admin`: every tenant's jobs, their logs, actions, recovery.

Only an admin key (`[admins] api_keys` in the tenants file) opens it; a tenant's
key answers the same 401 as no key, as an admin key does on `/v1/jobs`. What it
answers never holds a secret: no API key (only a key's hash prefix), no webhook
secret, no token, and webhook URLs without their query string, which may carry one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Final
from urllib.parse import urlsplit, urlunsplit

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, QueryParameter
from litestar.types import ControllerRouterHandler

from service.api.auth import authenticate_admin
from service.api.problems import ProblemError, problem_responses
from service.api.routes import (
    JOB_ID_PATTERN,
    JobId,
    PageCursor,
    PageLimit,
    Services,
    StatusFilter,
    cancel,
    options_handlers,
    recovery_window,
    resend,
)
from service.models import (
    Activity,
    ActivityMinute,
    AdminJob,
    AdminJobDetail,
    AdminJobList,
    AdminRecoverRequest,
    Job,
    Overview,
    Recovering,
    StatusCounts,
    TenantOverview,
    UpstreamPauseInfo,
    UpstreamSlots,
    usd,
    utcnow,
)
from service.store.jobs import StoredJob

_JOB_ID = re.compile(JOB_ID_PATTERN)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DEFAULT_ACTIVITY_MINUTES: Final = 180


@dataclass(frozen=True, slots=True)
class AdminCall:
    """An authenticated admin call: the id of the key used, and the services."""

    key_id: str
    services: Services


def provide_admin(request: Request[Any, Any, Any]) -> AdminCall:
    """The `admin` dependency of every `/v1/admin` handler: a 401 unless an admin key."""
    services: Services = request.app.state.services
    key_id = authenticate_admin(services.settings.tenants, request.headers.get("authorization"))
    return AdminCall(key_id=key_id, services=services)


TenantId = Annotated[
    str | None,
    QueryParameter(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Only this tenant's."),
]


@get(
    "/overview",
    summary="Every tenant at a glance",
    description=(
        "Per tenant: jobs by status, jobs in RunComfy now, upstream slots held, failed "
        "deliveries, charged today. The gateway: backlog, deliveries scheduled, upstream "
        "slots used of the limit, the upstream pause in force."
    ),
    responses=problem_responses(401, 503),
)
async def admin_overview(admin: NamedDependency[AdminCall]) -> Overview:
    """Counts of every configured tenant and of the gateway as a whole."""
    services = admin.services
    settings = services.settings
    tenants = sorted(settings.tenants.by_id)
    today = await services.spend.today()
    gateway, counts = await services.admin.counts(tenants, today)
    pause = await services.limits.upstream_pause()
    price_known = settings.price_micros > 0
    return Overview(
        at=utcnow(),
        backlog=gateway.backlog,
        deliveries_scheduled=gateway.deliveries_scheduled,
        upstream_slots=UpstreamSlots(
            used=gateway.upstream_slots, limit=settings.upstream_max_in_flight
        ),
        pause=None
        if pause is None
        else UpstreamPauseInfo(reason=pause.reason, remaining_s=round(pause.remaining_s, 1)),
        tenants=[
            TenantOverview(
                tenant=tenant,
                jobs=StatusCounts(**counts[tenant].jobs),
                in_runcomfy=counts[tenant].jobs["in_queue"] + counts[tenant].jobs["in_progress"],
                upstream_slots=counts[tenant].upstream_slots,
                max_in_flight=settings.tenants.by_id[tenant].max_in_flight,
                failed_deliveries=counts[tenant].failed_deliveries,
                charged_today_usd=usd(counts[tenant].charged_today_micros) if price_known else None,
            )
            for tenant in tenants
        ],
    )


@get(
    "/activity",
    summary="Per-minute activity",
    description=(
        "Jobs created, completed, failed and cancelled, and final webhooks delivered and "
        "failed, per minute (Redis's clock), oldest first, for the last `minutes` (at most a "
        "day): what the dashboard's charts draw."
    ),
    responses=problem_responses(401, 422, 503),
)
async def admin_activity(
    admin: NamedDependency[AdminCall],
    minutes: Annotated[
        int, QueryParameter(ge=1, le=1440, description="How many minutes, up to now.")
    ] = DEFAULT_ACTIVITY_MINUTES,
) -> Activity:
    """The last minutes' counts."""
    found = await admin.services.admin.activity.minutes(minutes)
    return Activity(minutes=[ActivityMinute(at=at, **counts) for at, counts in found])


@get(
    "/jobs",
    summary="Jobs of every tenant",
    description=(
        "Newest first, a page at a time, filtered by tenant and status. `q` finds one job by "
        "its id or by its RunComfy request id instead (the filters still apply)."
    ),
    responses=problem_responses(401, 422, 503),
)
async def admin_list_jobs(
    admin: NamedDependency[AdminCall],
    *,
    tenant: TenantId = None,
    status: StatusFilter = None,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
    q: Annotated[
        str | None,
        QueryParameter(
            min_length=1, max_length=128, description="A job id or a RunComfy request id."
        ),
    ] = None,
) -> AdminJobList:
    """A page of jobs across tenants, or the one job `q` names."""
    services = admin.services
    if q is not None:
        found = await _search(services, q.strip())
        keep = found is not None and (tenant is None or found.record.tenant == tenant)
        keep = keep and (status is None or (found is not None and found.record.status == status))
        items = [_admin_job(found)] if found is not None and keep else []
        return AdminJobList(items=items, next_cursor=None)
    tenants = [tenant] if tenant is not None else sorted(services.settings.tenants.by_id)
    page, next_cursor = await services.jobs.page(tenants, status=status, limit=limit, cursor=cursor)
    return AdminJobList(items=[_admin_job(stored) for stored in page], next_cursor=next_cursor)


@get(
    "/jobs/{job_id:str}",
    summary="Any tenant's job, with its logs",
    description="The job, its tenant, its paid submits to RunComfy and its webhook attempt log.",
    responses=problem_responses(401, 404, 503),
)
async def admin_get_job(job_id: JobId, admin: NamedDependency[AdminCall]) -> AdminJobDetail:
    """The job with what operators need to see of it."""
    services = admin.services
    stored = await _any_job(services, job_id)
    record = stored.record
    delivery_id = await services.deliveries.final_delivery_id(job_id)
    attempts = await services.deliveries.log(delivery_id) if delivery_id else []
    return AdminJobDetail(
        tenant=record.tenant,
        key_id=record.key_id,
        job=_redacted(stored),
        deadline_at=record.deadline_at,
        cancel_requested_at=record.cancel_requested_at,
        submit_retries=record.submit_retries,
        submits=record.submits,
        webhook_id=delivery_id,
        attempts=attempts,
    )


@post(
    "/jobs/{job_id:str}/cancel",
    status_code=200,
    summary="Cancel any tenant's job",
    description="As `POST /v1/jobs/{job_id}/cancel`, for any tenant's job.",
    responses=problem_responses(401, 404, 409, 503),
)
async def admin_cancel_job(job_id: JobId, admin: NamedDependency[AdminCall]) -> Response[Job]:
    """Cancel the job as its tenant could."""
    services = admin.services
    answer = await cancel(services.jobs, lambda: _any_job(services, job_id))
    return Response(_redact(answer.content), status_code=answer.status_code)


@post(
    "/jobs/{job_id:str}/deliveries",
    status_code=202,
    summary="Send any tenant's final webhook again",
    description="As `POST /v1/jobs/{job_id}/deliveries`, for any tenant's job.",
    responses=problem_responses(401, 404, 409, 503),
)
async def admin_resend_delivery(job_id: JobId, admin: NamedDependency[AdminCall]) -> Job:
    """Queue the job's final event again, with the same `webhook-id`."""
    services = admin.services
    return _redact(await resend(services.deliveries, lambda: _any_job(services, job_id)))


@get(
    "/deliveries/failed",
    summary="Failed webhooks",
    description=(
        "Jobs whose final webhook failed and was not sent again since, newest finish first; "
        "one tenant's or every tenant's."
    ),
    responses=problem_responses(401, 422, 503),
)
async def admin_failed_deliveries(
    admin: NamedDependency[AdminCall],
    tenant: TenantId = None,
    limit: Annotated[int, QueryParameter(ge=1, le=100, description="How many.")] = 50,
) -> AdminJobList:
    """The latest failed final deliveries, with their jobs."""
    services = admin.services
    tenants = [tenant] if tenant is not None else sorted(services.settings.tenants.by_id)
    found: list[tuple[int, str]] = []
    for name in tenants:
        found += [(at, job_id) for job_id, at in await services.deliveries.failed(name, limit)]
    newest = [job_id for _, job_id in sorted(found, reverse=True)[:limit]]
    jobs = await services.jobs.get_many(newest)
    return AdminJobList(
        items=[_admin_job(stored) for stored in jobs if stored is not None], next_cursor=None
    )


@post(
    "/deliveries/recover",
    status_code=202,
    summary="Send failed webhooks again, one tenant's or all",
    description=("As `POST /v1/deliveries/recover`, for `tenant` or, without it, every tenant."),
    responses=problem_responses(400, 401, 404, 422, 503),
)
async def admin_recover_deliveries(
    data: JSONBody[AdminRecoverRequest], admin: NamedDependency[AdminCall]
) -> Recovering:
    """Queue the failed final webhooks of jobs finished in the window again."""
    services = admin.services
    since_ms, until_ms = recovery_window(data)
    tenants = sorted(services.settings.tenants.by_id)
    if data.tenant is not None:
        if data.tenant not in services.settings.tenants.by_id:
            raise ProblemError(404, "no such tenant")
        tenants = [data.tenant]
    count = 0
    for tenant in tenants:
        count += await services.deliveries.recover(tenant, since_ms=since_ms, until_ms=until_ms)
    return Recovering(recovering=count)


def admin_router() -> ControllerRouterHandler:
    """`/v1/admin`: every handler behind the admin key."""
    handlers = [
        admin_overview,
        admin_activity,
        admin_list_jobs,
        admin_get_job,
        admin_cancel_job,
        admin_resend_delivery,
        admin_failed_deliveries,
        admin_recover_deliveries,
    ]
    return Router(
        "/v1/admin",
        route_handlers=[*options_handlers(handlers), *handlers],
        dependencies={"admin": Provide(provide_admin, sync_to_thread=False)},
        security=[{"adminKey": []}],
        tags=["admin"],
    )


async def _search(services: Services, q: str) -> StoredJob | None:
    """The job `q` names by its id, or by its RunComfy request id."""
    job_id: str | None = q if _JOB_ID.match(q) else None
    if job_id is None and _REQUEST_ID.match(q):
        job_id = await services.admin.job_of_request(q)
    return await services.jobs.get(job_id) if job_id is not None else None


async def _any_job(services: Services, job_id: str) -> StoredJob:
    """Any tenant's job, or a 404."""
    stored = await services.jobs.get(job_id) if _JOB_ID.match(job_id) else None
    if stored is None:
        raise ProblemError(404, "no such job")
    return stored


def _admin_job(stored: StoredJob) -> AdminJob:
    return AdminJob(tenant=stored.record.tenant, job=_redacted(stored))


def _redacted(stored: StoredJob) -> Job:
    return _redact(stored.record.view(stored.webhook_state, stored.webhook_attempts))


def _redact(job: Job) -> Job:
    """The job without its webhook URL's query and fragment, which may carry a token."""
    if job.webhook is None:
        return job
    parts = urlsplit(job.webhook.url)
    if not parts.query and not parts.fragment:
        return job
    url = urlunsplit(parts._replace(query="", fragment="")) + "?…"
    webhook = msgspec.structs.replace(job.webhook, url=url)
    return msgspec.structs.replace(job, webhook=webhook)
