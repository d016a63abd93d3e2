"""Prometheus metrics, defined per registry so each app (and each test) counts on its own.

Nothing here is registered at import time: `ApiMetrics()` builds its metrics on
a fresh `CollectorRegistry`, and `/metrics` renders that registry alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["PROMETHEUS_MEDIA_TYPE", "ApiMetrics", "WorkerMetrics"]

PROMETHEUS_MEDIA_TYPE: Final = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")
"""The exposition format's media type without its charset: Litestar appends
`; charset=utf-8` to every `text/` type it answers, and a second one confuses scrapers."""

# Request latency buckets (seconds): the API answers from Redis, so most answers
# take milliseconds; the top buckets catch Redis trouble.
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# RunComfy calls cross the internet: tens of milliseconds to the timeout.
_UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One output copied into a tenant's store: a small video in a second, 2 GiB in minutes.
_COPY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Event to delivery: milliseconds when the receiver is up, hours along the retry schedule.
_DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 36000)
# Status polls of one job: a handful for short runs, dozens for long ones.
_POLLS_BUCKETS = (1, 2, 3, 5, 8, 12, 16, 20, 25, 30, 40, 50, 60, 80, 120, 200)
# From RunComfy's end of a run to the poll that saw it: about a poll interval.
_DETECTION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 12, 15, 30, 60)
_CLASS_LABELS = ("resolution", "num_frames", "pro_mode")


class LearnedWindow(Protocol):
    """What the learned-window gauge shows of one window (`service.worker.timing.Window`)."""

    @property
    def low_s(self) -> float: ...
    @property
    def median_s(self) -> float: ...
    @property
    def high_s(self) -> float: ...
    @property
    def step_s(self) -> float: ...


def _class_labels(input_class: str) -> dict[str, str]:
    """`720p:129:std` as the labels resolution, num_frames, pro_mode."""
    if input_class == "any":  # the waits from a queue position: every class
        return dict.fromkeys(_CLASS_LABELS, "any")
    resolution, frames, mode = ([*input_class.split(":"), "", "", ""])[:3]
    return {"resolution": resolution, "num_frames": frames, "pro_mode": str(mode == "pro").lower()}


class _Common:
    """What both processes count: schedule depths, the upstream pause, finished jobs, tenants."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.schedule_depth = Gauge(
            "rcg_schedule_depth",
            "Members of each schedule and jobs holding upstream slots, read at scrape time.",
            ["schedule"],
            registry=self.registry,
        )
        self.upstream_paused = Gauge(
            "rcg_upstream_paused",
            "1 while upstream submits are paused for every replica, by reason (402, 429).",
            ["reason"],
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "rcg_redis_up",
            "1 when Redis answered the last scrape's read, else 0.",
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "rcg_jobs_finished",
            "Jobs this process moved to a final state, by status and tenant.",
            ["status", "tenant"],
            registry=self.registry,
        )
        self.charged_usd = Counter(
            "rcg_charged_usd",
            "USD charged for jobs this process made final after RunComfy ran them, by tenant.",
            ["tenant"],
            registry=self.registry,
        )
        self.tenants_config_ok = Gauge(
            "rcg_tenants_config_ok",
            "0 while the last reload of the tenants file was refused (the old tenants stay).",
            registry=self.registry,
        )
        self.tenants_config_ok.set(1)
        self.tenants_reload_failures = Counter(
            "rcg_tenants_reload_failures",
            "Reloads of the tenants file refused because the new file was invalid.",
            registry=self.registry,
        )

    def job_finished(self, status: str, tenant: str) -> None:
        """Count one job reaching a final state."""
        self.jobs_finished.labels(status=status, tenant=tenant).inc()

    def job_charged(self, tenant: str, amount_usd: float) -> None:
        """Count what one job was charged."""
        self.charged_usd.labels(tenant=tenant).inc(amount_usd)

    def tenants_reloaded(self, ok: bool) -> None:
        """Record a reload of the tenants file."""
        self.tenants_config_ok.set(1 if ok else 0)
        if not ok:
            self.tenants_reload_failures.inc()

    def set_depths(self, depths: Mapping[str, int] | None) -> None:
        """Record the schedule depths read for this scrape, or that Redis did not answer."""
        self.redis_up.set(0 if depths is None else 1)
        for name, value in (depths or {}).items():
            self.schedule_depth.labels(schedule=name).set(value)

    def set_pause(self, reason: str | None) -> None:
        """Record the upstream pause in force (None: none)."""
        for known in ("insufficient_funds", "rate_limited"):
            self.upstream_paused.labels(reason=known).set(1 if reason == known else 0)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class WorkerMetrics(_Common):
    """The worker's metrics: upstream calls, webhook attempts and delivery latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.upstream_latency = Histogram(
            "rcg_upstream_request_duration_seconds",
            "RunComfy calls by call (submit, status, result, cancel), whatever their outcome.",
            ["call"],
            buckets=_UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "rcg_upstream_errors",
            "Failed RunComfy calls by call and kind (rate_limited, server, unknown, ...).",
            ["call", "kind"],
            registry=self.registry,
        )
        self.webhook_attempts = Counter(
            "rcg_webhook_attempts",
            "Webhook delivery attempts by tenant and outcome: delivered, or the error class.",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.submit_stall = Gauge(
            "rcg_submit_stall_seconds",
            "How long the oldest job a submit claim could take has gone unclaimed (0: none).",
            registry=self.registry,
        )
        self.webhook_latency = Histogram(
            "rcg_webhook_delivery_seconds",
            "From the event (a job's state change) to its successful delivery, by tenant.",
            ["tenant"],
            buckets=_DELIVERY_BUCKETS,
            registry=self.registry,
        )

        self.output_copy_bytes = Counter(
            "rcg_output_copy_bytes",
            "Output bytes streamed from RunComfy into tenants' stores (as they pass), by tenant.",
            ["tenant"],
            registry=self.registry,
        )
        self.output_copy_latency = Histogram(
            "rcg_output_copy_duration_seconds",
            "Time to copy one output into its tenant's store, by tenant and outcome.",
            ["tenant", "outcome"],
            buckets=_COPY_BUCKETS,
            registry=self.registry,
        )
        self.poll_learned = Gauge(
            "rcg_poll_learned_seconds",
            "Learned length of a phase (queue, run) of recent jobs per input class, and of the "
            "wait from a queue position to the start (phase queue_at_0 ... queue_at_16+, class "
            "labels any), by quantile (0.05, 0.5, 0.95), and the poll spacing between the outer "
            "two (quantile=step).",
            [*_CLASS_LABELS, "phase", "quantile"],
            registry=self.registry,
        )
        self.polls_per_job = Histogram(
            "rcg_polls_per_job",
            "Status polls of each job that completed, by input class.",
            _CLASS_LABELS,
            buckets=_POLLS_BUCKETS,
            registry=self.registry,
        )
        self.detection_delay = Histogram(
            "rcg_poll_detection_delay_seconds",
            "From RunComfy's finished_at to the poll that saw the job completed, by input class.",
            _CLASS_LABELS,
            buckets=_DETECTION_BUCKETS,
            registry=self.registry,
        )

    def output_copied(self, tenant: str, seconds: float, outcome: str) -> None:
        """Record one output copy: `stored`, `retry` (a passing failure) or `failed`."""
        self.output_copy_latency.labels(tenant=tenant, outcome=outcome).observe(seconds)

    def job_detected(self, input_class: str, polls: int, delay_s: float | None) -> None:
        """Record a completed job's polls and, when RunComfy gave its end, how late we saw it."""
        labels = _class_labels(input_class)
        if polls > 0:
            self.polls_per_job.labels(**labels).observe(polls)
        if delay_s is not None:
            self.detection_delay.labels(**labels).observe(max(0.0, delay_s))

    def set_learned(self, windows: Mapping[tuple[str, str], LearnedWindow]) -> None:
        """Publish the learned windows (the worker's cache, as last refreshed)."""
        self.poll_learned.clear()
        for (input_class, phase), window in windows.items():
            labels = _class_labels(input_class)
            for quantile, value in (
                ("0.05", window.low_s),
                ("0.5", window.median_s),
                ("0.95", window.high_s),
                ("step", window.step_s),
            ):
                self.poll_learned.labels(**labels, phase=phase, quantile=quantile).set(value)

    def upstream_call(self, call: str, seconds: float, error: str | None) -> None:
        """Record one RunComfy call (the client's `on_call`)."""
        self.upstream_latency.labels(call=call).observe(seconds)
        if error is not None:
            self.upstream_errors.labels(call=call, kind=error).inc()

    def webhook_attempt(self, outcome: str, since_event_s: float | None, tenant: str) -> None:
        """Record one delivery attempt of `tenant`; `since_event_s` is set when it delivered."""
        self.webhook_attempts.labels(tenant=tenant, outcome=outcome).inc()
        if since_event_s is not None:
            self.webhook_latency.labels(tenant=tenant).observe(since_event_s)


class ApiMetrics(_Common):
    """The HTTP API's metrics: requests, their latency, accepted jobs, and the common ones."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.requests = Counter(
            "rcg_api_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rcg_api_request_duration_seconds",
            "Time from a request's arrival to its answer, by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs_accepted = Counter(
            "rcg_jobs_accepted",
            "Jobs accepted by POST /v1/jobs (not counting idempotent replays), by tenant.",
            ["tenant"],
            registry=self.registry,
        )
        self.budget_remaining = Gauge(
            "rcg_budget_remaining_usd",
            "USD a tenant's budget has left in its current day or month, read at scrape time.",
            ["tenant", "period"],
            registry=self.registry,
        )

    def set_budget_remaining(self, remaining: Mapping[tuple[str, str], float] | None) -> None:
        """Record what each budget has left, read for this scrape (None: Redis did not answer)."""
        self.budget_remaining.clear()
        for (tenant, period), left in (remaining or {}).items():
            self.budget_remaining.labels(tenant=tenant, period=period).set(left)
