"""Every shape the gateway speaks: the job request, the job, webhook events, problems.

These msgspec Structs are the single definition of each shape: the API validates
requests against them, Redis stores them, JSON answers and webhook bodies are
encoded from them, and the OpenAPI document is generated from them.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

MODEL: Final = "tencent/hunyuan/video-to-video"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

MAX_PROMPT_CHARS: Final = 4000
MAX_URL_CHARS: Final = 2048
MAX_METADATA_BYTES: Final = 4096
MIN_TIMEOUT_S: Final = 10
MAX_TIMEOUT_S: Final = 86_400

JobStatus = Literal["pending", "in_queue", "in_progress", "completed", "failed", "cancelled"]
FINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
UPSTREAM_STATUSES: Final = frozenset({"in_queue", "in_progress"})

EventType = Literal["job.started", "job.completed", "job.failed", "job.cancelled"]
DEFAULT_EVENTS: Final[tuple[EventType, ...]] = ("job.completed", "job.failed", "job.cancelled")
WebhookState = Literal["pending", "delivered", "failed", "skipped"]


class Base(Struct, forbid_unknown_fields=True):
    """Request shapes reject unknown fields: a typo must fail loudly, not be ignored."""


class VideoInput(Base, kw_only=True):
    """The model input of `tencent/hunyuan/video-to-video`, exactly the seed's schema."""

    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)]
    video_url: Annotated[str, Meta(min_length=1, max_length=MAX_URL_CHARS)]
    seed: int | UnsetType = UNSET
    pro_mode: bool = False
    resolution: Literal["480p", "580p", "720p"] = "720p"
    aspect_ratio: Literal["16:9", "9:16"] = "16:9"
    num_frames: Literal[85, 129] = 129
    strength: Annotated[float, Meta(ge=0.01, le=1.0)] = 0.85


class WebhookSpec(Base):
    """Where and for which events the caller wants to be called back."""

    url: Annotated[str, Meta(min_length=1, max_length=MAX_URL_CHARS)]
    events: Annotated[list[EventType], Meta(min_length=1, max_length=4)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_EVENTS)
    )


class JobRequest(Base):
    """The body of `POST /v1/jobs`."""

    input: VideoInput
    model: Literal["tencent/hunyuan/video-to-video"] = MODEL
    webhook: WebhookSpec | None = None
    metadata: dict[str, Any] | None = None
    timeout_s: Annotated[int, Meta(ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)] | None = None
    """Seconds the job may take before it fails with `timeout`; default GATEWAY_JOB_TIMEOUT_S."""


class FieldError(Struct):
    """One offending field: a JSON pointer into the request and what is wrong with it."""

    pointer: str
    detail: str


class Problem(Struct, omit_defaults=True):
    """An RFC 9457 problem details body."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | UnsetType = UNSET


BudgetPeriod = Literal["day", "month"]


class BudgetProblem(Problem, kw_only=True):
    """The 402 problem of a submit over budget: which budget, and what counts against it."""

    budget_usd: float
    charged_usd: float
    held_usd: float
    period: BudgetPeriod
    resets_at: datetime


class JobErrorInfo(Struct):
    """Why a job failed: a stable code and a human message."""

    code: str
    message: str


class UpstreamRef(Struct):
    """The job's request at RunComfy."""

    request_id: str
    queue_position: int | None = None


class SubmitAttempt(Struct, omit_defaults=True):
    """One paid submit sent to RunComfy, recorded before it is sent.

    `outcome` is `sent` until the answer is known; a `sent` left behind by a
    crashed worker is an unknown outcome, handled by the documented policy.
    """

    at: datetime
    outcome: Literal["sent", "accepted", "rejected", "unreachable", "unknown"] = "sent"
    request_id: str | None = None
    detail: str | None = None


class WebhookView(Struct):
    """The job's webhook as callers see it."""

    url: str
    events: list[EventType]
    state: WebhookState
    attempts: int


MICROS_PER_USD: Final = 1_000_000
"""Amounts are whole micro-dollars wherever they are added up (Redis, Lua): sums stay exact."""


def usd(micros: int) -> float:
    """Micro-dollars as the dollars a JSON answer carries, rounded to 6 decimals."""
    return round(micros / MICROS_PER_USD, 6)


class Cost(Struct):
    """What a job costs: its estimate from submit, and what was charged once it is final.

    Both null while the price is unknown. `charged_usd` is null until the job is
    final, then the estimate if RunComfy ran it (it reached `in_progress`, or
    completed), else 0.
    """

    estimate_usd: float | None
    charged_usd: float | None


class OutputFile(Struct, kw_only=True):
    """One output of a job whose tenant keeps its outputs (README, Durable outputs).

    `url` is where the copy is (a presigned GET URL, or `s3://bucket/key`) and `upstream_url`
    RunComfy's URL it was copied from; on a job failed with `output_copy_failed`, the
    outputs not copied have only their `upstream_url`.
    """

    url: str | None
    upstream_url: str
    bytes: int | None = None
    sha256: str | None = None
    """Lowercase hex digest of the bytes stored."""
    content_type: str | None = None


_MAY_HAVE_PAID: Final = frozenset({"sent", "accepted", "unknown"})
"""Submit outcomes after which a paid run may exist; rejected and unreachable ones created none."""


class Job(Struct):
    """A job as the API answers it and as webhook events carry it."""

    id: str
    status: JobStatus
    model: str
    input: VideoInput
    output: dict[str, Any] | None
    error: JobErrorInfo | None
    upstream: UpstreamRef | None
    webhook: WebhookView | None
    metadata: dict[str, Any] | None
    created_at: datetime
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cost: Cost
    upstream_submits: int = 0
    """Submits that may have created a paid run: accepted, or sent with no answer known."""
    timeout_s: int = 0
    """Seconds the job may take from its creation before it fails with `timeout`."""
    output_files: list[OutputFile] | None = None
    """Each output copied into the tenant's store; null when the tenant keeps none."""


class JobRecord(Struct, kw_only=True, omit_defaults=True):
    """A job as stored in Redis: the caller-visible job plus what the gateway needs to run it.

    Stored without the fields still at their defaults (nulls, no retries): less
    to keep in Redis for every finished job, and it decodes the same.
    """

    id: str
    tenant: str
    key_id: str
    status: JobStatus = "pending"
    input: VideoInput
    webhook: WebhookSpec | None = None
    metadata: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    error: JobErrorInfo | None = None
    upstream: UpstreamRef | None = None
    created_at: datetime
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime
    submits: list[SubmitAttempt] = msgspec.field(default_factory=list)
    submit_retries: int = 0
    cancel_requested_at: datetime | None = None
    estimate_micros: int | None = None
    """What the job is held and charged at (micro-dollars); None while the price is unknown."""
    output_files: list[OutputFile] | None = None
    upstream_output: dict[str, Any] | None = None
    """RunComfy's output while its files are copied into the tenant's store (not shown)."""
    copy_attempts: int = 0
    """Copies of the outputs tried and failed for a passing reason, for the backoff."""
    copy_error: str | None = None
    """Why the last of those failed: the job's error says it if its deadline comes first."""

    def charge_micros(self) -> int | None:
        """What the job is charged: None until it is final, then its estimate if it ran, else 0.

        It ran when RunComfy started it (`started_at`) or completed it; a job
        cancelled or failed before that was never billed.
        """
        if self.status not in FINAL_STATUSES:
            return None
        ran = self.status == "completed" or self.started_at is not None
        return (self.estimate_micros or 0) if ran else 0

    def cost(self) -> Cost:
        """The job's `cost` as callers see it."""
        if self.estimate_micros is None:
            return Cost(estimate_usd=None, charged_usd=None)
        charged = self.charge_micros()
        return Cost(
            estimate_usd=usd(self.estimate_micros),
            charged_usd=None if charged is None else usd(charged),
        )

    def view(self, webhook_state: WebhookState, webhook_attempts: int) -> Job:
        """The job as its tenant sees it, with the webhook's delivery state."""
        webhook = None
        if self.webhook is not None:
            webhook = WebhookView(
                url=self.webhook.url,
                events=self.webhook.events,
                state=webhook_state,
                attempts=webhook_attempts,
            )
        return Job(
            id=self.id,
            status=self.status,
            model=MODEL,
            input=self.input,
            output=self.output,
            error=self.error,
            upstream=self.upstream,
            webhook=webhook,
            metadata=self.metadata,
            created_at=self.created_at,
            submitted_at=self.submitted_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            cost=self.cost(),
            upstream_submits=sum(1 for s in self.submits if s.outcome in _MAY_HAVE_PAID),
            timeout_s=self.timeout_s,
            output_files=self.output_files,
        )

    @property
    def timeout_s(self) -> int:
        """The job's own timeout: its deadline is that long after its creation."""
        return round((self.deadline_at - self.created_at).total_seconds())


class UpstreamPauseInfo(Struct):
    """Upstream submits are paused for every replica: why, and for how much longer."""

    reason: str
    remaining_s: float


class Probe(Struct, omit_defaults=True):
    """The answer of `/healthz` and `/readyz`; readiness also reports an upstream pause."""

    status: str
    upstream_pause: UpstreamPauseInfo | None = None


class JobList(Struct):
    """One page of `GET /v1/jobs`, newest first."""

    items: list[Job]
    next_cursor: str | None


class JobCounts(Struct):
    """Jobs that reached each final status."""

    completed: int
    failed: int
    cancelled: int


class DayUsage(Struct):
    """One UTC day of a tenant's jobs: those submitted that day, and what they cost.

    The amounts are null while the price is unknown.
    """

    date: str
    jobs: JobCounts
    charged_usd: float | None
    held_usd: float | None


class BudgetState(Struct):
    """A budget in force and what counts against it in its current period."""

    budget_usd: float
    charged_usd: float
    held_usd: float
    resets_at: datetime


class Budgets(Struct):
    """The tenant's budgets, null where it has none."""

    day: BudgetState | None
    month: BudgetState | None


class Usage(Struct):
    """The answer of `GET /v1/usage`: a tenant's spend day by day, and its budgets."""

    tenant: str
    days: list[DayUsage]
    budget: Budgets


class WebhookEvent(Struct):
    """The body of a webhook: Standard Webhooks' `{type, timestamp, data}`."""

    type: EventType
    timestamp: datetime
    data: Job


MAX_EXCERPT_BYTES: Final = 2048
"""What the attempt log keeps of a receiver's answer, in bytes as stored."""

_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_json_encode = msgspec.json.Encoder().encode


def response_excerpt(answer: bytes | str) -> str:
    """A receiver's answer as the attempt log keeps it: text of at most 2 KB as stored.

    Undecodable bytes become U+FFFD and control characters `?` (a NUL alone
    would take 6 bytes as JSON); the text is then cut, on a character
    boundary, until its JSON encoding fits in `MAX_EXCERPT_BYTES`.
    """
    text = answer.decode("utf-8", errors="replace") if isinstance(answer, bytes) else answer
    text = _CONTROL.sub("?", text[:MAX_EXCERPT_BYTES])
    fits, over = 0, len(text) + 1  # the longest prefix known to fit, the shortest known not to
    while over - fits > 1:
        middle = (fits + over) // 2
        if len(_json_encode(text[:middle])) - 2 <= MAX_EXCERPT_BYTES:
            fits = middle
        else:
            over = middle
    return text[:fits]


class DeliveryAttempt(Struct, kw_only=True):
    """One webhook delivery attempt, as kept in the attempt log.

    Stored as a JSON object a line. Every field but the first two has a default,
    and so must any field added later: entries stored before it still decode.
    """

    attempt: int
    at: datetime
    status_code: int | None = None
    latency_ms: int = 0
    error: str | None = None
    response_excerpt: str = ""
    next_attempt_at: datetime | None = None


class DeliveryLog(Struct):
    """The answer of `GET /v1/jobs/{id}/deliveries`."""

    items: list[DeliveryAttempt]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC, at millisecond precision."""
    # Whole milliseconds added to the epoch: exact, and a third of the cost of now() + replace().
    return _EPOCH + timedelta(milliseconds=time.time_ns() // 1_000_000)


# Operating it: recovery of failed deliveries and the admin API.


RFC3339 = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
"""An RFC 3339 time as sent; read as one where it is used (a number is not a time)."""


class RecoverRequest(Base):
    """The body of `POST /v1/deliveries/recover`: a window of finish times (RFC 3339)."""

    since: RFC3339
    until: RFC3339 | None = None


class AdminRecoverRequest(RecoverRequest, kw_only=True):
    """The body of `POST /v1/admin/deliveries/recover`: a window, and one tenant or all."""

    tenant: str | None = None


class Recovering(Struct):
    """How many failed deliveries were queued to be sent again."""

    recovering: int


class StatusCounts(Struct):
    """Jobs in each status (final ones until they expire with retention)."""

    pending: int
    in_queue: int
    in_progress: int
    completed: int
    failed: int
    cancelled: int


class TenantOverview(Struct):
    """One tenant at a glance."""

    tenant: str
    jobs: StatusCounts
    in_runcomfy: int
    """Jobs `in_queue` or `in_progress` at RunComfy now."""
    upstream_slots: int
    """Upstream slots the tenant's jobs hold (a submit on the way takes one too)."""
    max_in_flight: int | None
    failed_deliveries: int
    """Final webhooks that failed and were not re-sent since, within retention."""
    charged_today_usd: float | None
    """Charged today (UTC, by Redis's clock) for jobs submitted today; null: price unknown."""


class UpstreamSlots(Struct):
    """Jobs inside RunComfy (or on their way) against `GATEWAY_UPSTREAM_MAX_IN_FLIGHT`."""

    used: int
    limit: int


class Overview(Struct):
    """The answer of `GET /v1/admin/overview`: every tenant, and the gateway as a whole."""

    at: datetime
    backlog: int
    """Pending jobs waiting for an upstream slot, all tenants."""
    deliveries_scheduled: int
    """Webhook deliveries waiting, retrying or being sent."""
    upstream_slots: UpstreamSlots
    pause: UpstreamPauseInfo | None
    tenants: list[TenantOverview]


class ActivityMinute(Struct):
    """What happened in one minute: jobs created and ended, final webhooks ended."""

    at: datetime
    created: int
    completed: int
    failed: int
    cancelled: int
    delivered: int
    delivery_failed: int


class Activity(Struct):
    """The answer of `GET /v1/admin/activity`: the last minutes, oldest first."""

    minutes: list[ActivityMinute]


class AdminJob(Struct):
    """A job and its tenant, as the admin API lists them."""

    tenant: str
    job: Job


class AdminJobList(Struct):
    """One page of `GET /v1/admin/jobs`, newest first."""

    items: list[AdminJob]
    next_cursor: str | None


class AdminJobDetail(Struct):
    """Any tenant's job with what only operators see: its submits and its attempt log."""

    tenant: str
    key_id: str
    """Which of the tenant's API keys submitted it (a hash prefix, never the key)."""
    job: Job
    deadline_at: datetime
    cancel_requested_at: datetime | None
    submit_retries: int
    submits: list[SubmitAttempt]
    webhook_id: str | None
    attempts: list[DeliveryAttempt]
