"""Prometheus metrics, defined per registry so each app (and each test) counts on its own.

Nothing here is registered at import time: `ApiMetrics()` builds its metrics on
a fresh `CollectorRegistry`, and `/metrics` renders that registry alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["PROMETHEUS_CONTENT_TYPE", "ApiMetrics"]

# Request latency buckets (seconds): the API answers from Redis, so most answers
# take milliseconds; the top buckets catch Redis trouble.
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """The HTTP API's metrics: requests, their latency, accepted jobs, schedule depths."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
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

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route, method=method).observe(seconds)

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
