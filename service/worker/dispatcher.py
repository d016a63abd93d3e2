"""The dispatcher: delivers webhook events, signed, retried on the schedule, logged.

Each attempt sends the exact bytes encoded when the job changed state, with a
fresh `webhook-timestamp` and signature (receivers check the timestamp within
±5 minutes) and the same `webhook-id`. One slow or dead receiver never delays
the others: at most `per_host` attempts run against one host at a time, and a
claimed delivery whose host is busy is handed back for a moment instead of
holding one of the dispatcher's slots while it waits.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

import aiohttp

from service.config import Settings
from service.logs import job_id_var, tenant_var
from service.metrics import WorkerMetrics
from service.models import DeliveryAttempt, utcnow
from service.store.deliveries import Delivery, DeliveryStore
from service.store.schedules import Claim, Schedules
from service.webhooks.delivery import AttemptResult, deliver_once, next_delay, outcome
from service.webhooks.guard import callback_url_problem
from service.webhooks.signing import webhook_headers
from service.worker.loop import ClaimLoop, Heartbeat

log = logging.getLogger(__name__)


class Dispatcher(ClaimLoop):
    """Claims due deliveries and makes one attempt at each."""

    name = "dispatcher"

    def __init__(
        self,
        settings: Settings,
        deliveries: DeliveryStore,
        schedules: Schedules,
        session: aiohttp.ClientSession,
        heartbeat: Heartbeat,
        *,
        metrics: WorkerMetrics | None = None,
        concurrency: int = 128,
        per_host: int = 8,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            schedules,
            heartbeat,
            concurrency=concurrency,
            drain_s=settings.shutdown_s,
            rng=rng,
        )
        self.settings = settings
        self.deliveries = deliveries
        self.session = session
        self.per_host = per_host
        self.metrics = metrics
        self._busy: Counter[str] = Counter()

    async def claim(self, max_items: int) -> list[Claim]:
        """Claim deliveries whose next attempt is due."""
        return await self.schedules.claim("deliver", max_items)

    async def work(self, claim: Claim) -> None:
        """Make one attempt at a delivery and record it."""
        delivery = await self.deliveries.get(claim.member)
        if delivery is None:
            await self.schedules.release(claim, delay_s=None)
            return
        job_id_var.set(delivery.job_id)  # log lines name the job, not the delivery id
        tenant_var.set(delivery.tenant)
        host = urlsplit(delivery.url).hostname or ""
        if self._busy[host] >= self.per_host:
            await self.schedules.release(claim, delay_s=self.rng.uniform(0.5, 1.5))
            return
        self._busy[host] += 1
        try:
            result = await self._attempt(delivery)
        finally:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
        await self._record(delivery, claim, result)

    async def _attempt(self, delivery: Delivery) -> AttemptResult:
        tenant = self.settings.tenants.by_id.get(delivery.tenant)
        if tenant is None:
            return AttemptResult(status_code=None, latency_ms=0, error="unknown_tenant")
        # The tenants file may have changed since the job was accepted.
        if callback_url_problem(delivery.url, tenant.callback_hosts) is not None:
            return AttemptResult(status_code=None, latency_ms=0, error="invalid_url")
        headers = webhook_headers(
            tenant.webhook_secrets, delivery.id, int(time.time()), delivery.body
        )
        return await deliver_once(
            self.session,
            delivery.url,
            headers,
            delivery.body,
            deadline_s=self.settings.webhook_deadline_s,
        )

    async def _record(self, delivery: Delivery, claim: Claim, result: AttemptResult) -> None:
        verdict = outcome(result)
        retry_in: float | None = None
        state: Literal["pending", "delivered", "failed"]
        if verdict == "delivered":
            state = "delivered"
        elif verdict == "gone":
            state = "failed"
        else:
            retry_in = next_delay(
                self.settings.webhook_retry_schedule,
                delivery.attempts_since_resend + 1,
                result.retry_after_s,
                self.rng,
            )
            state = "pending" if retry_in is not None else "failed"
        now = utcnow()
        attempt = DeliveryAttempt(
            attempt=delivery.attempts + 1,
            at=now,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error,
            response_excerpt=result.response_excerpt,
            next_attempt_at=now + timedelta(seconds=retry_in) if retry_in is not None else None,
        )
        if self.metrics is not None:
            since_event = time.time() - delivery.created_ms / 1000 if state == "delivered" else None
            self.metrics.webhook_attempt(result.error or "delivered", since_event)
        recorded = await self.deliveries.record_attempt(
            delivery.id, claim.lease, attempt, state=state, retry_in_s=retry_in
        )
        if not recorded:
            log.warning("dispatcher: %s: lease lost, attempt not recorded", delivery.id)
        elif state == "failed":
            log.warning(
                "dispatcher: %s to job %s failed for good after %d attempt(s): %s %s",
                delivery.event_type,
                delivery.job_id,
                delivery.attempts + 1,
                result.status_code,
                result.error,
            )
