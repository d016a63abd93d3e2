"""The dispatcher: delivers webhook events, signed, retried on the schedule, logged.

Each attempt sends the exact bytes encoded when the job changed state, with a
fresh `webhook-timestamp` and signature (receivers check the timestamp within
±5 minutes) and the same `webhook-id`. One slow or dead receiver never delays
the others: at most `per_host` attempts run against one host at a time, and at
most `per_host_waiting` more deliveries wait in hand for one of its slots, so
one host never holds all of the dispatcher's slots. A delivery beyond that, or
one that waited too long, is handed back for about as long as the host takes
to free a slot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
from redis.exceptions import RedisError

from service.config import Settings
from service.logs import job_id_var, tenant_var
from service.metrics import WorkerMetrics
from service.models import DeliveryAttempt, utcnow
from service.store.deliveries import Delivery, DeliveryStore
from service.store.jobs import HandedOver
from service.store.schedules import Claim, Schedules
from service.webhooks.delivery import AttemptResult, deliver_once, next_delay, outcome
from service.webhooks.guard import callback_url_problem
from service.webhooks.signing import webhook_headers
from service.worker.loop import ClaimLoop, Heartbeat

log = logging.getLogger(__name__)

CONCURRENCY = 256
PER_HOST = 64  # attempts in flight at one host; the webhook session's limit_per_host too
PER_HOST_WAITING = 64
HAND_BACK_MIN_S = 0.02
HAND_BACK_MAX_S = 1.5


class _HostGate:
    """One host's attempt slots, and how many deliveries hold or wait for one."""

    def __init__(self, slots: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.users = 0  # in flight or waiting: the gate is dropped when this falls to 0
        self.waiting = 0
        self.freed_at = time.monotonic()  # when a slot last came free


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
        concurrency: int = CONCURRENCY,
        per_host: int = PER_HOST,
        per_host_waiting: int = PER_HOST_WAITING,
        rng: random.Random | None = None,
    ) -> None:
        if per_host + per_host_waiting >= concurrency:
            raise ValueError("one host must not be able to take every dispatcher slot")
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
        self.per_host_waiting = per_host_waiting
        # Waiting for a slot and the attempt itself must both fit in the claim's lease.
        self.max_wait_s = max(0.0, (settings.lease_s - settings.webhook_deadline_s) / 2)
        self.metrics = metrics
        self._gates: dict[str, _HostGate] = {}
        # The deliveries of claimed items, read together when claimed and taken by `work`.
        self._read: dict[str, Delivery | None] = {}  # by the claim's fencing token
        self._lease_ms = round(settings.lease_s * 1000)
        self._releasing: set[asyncio.Task[bool]] = set()  # held so they are not collected

    def lease_ms_if_free(self) -> int | None:
        """A change may claim its new delivery for this dispatcher while it has a free slot."""
        if not self.accepting or len(self._in_hand) >= self.concurrency:
            return None
        return self._lease_ms

    def take(self, delivery: HandedOver) -> None:
        """Send a delivery a change of this process created and claimed for it."""
        claim = Claim(member=delivery.id, lease=delivery.lease)
        self._read[claim.lease.token] = Delivery(
            id=delivery.id,
            job_id=delivery.job_id,
            tenant=delivery.tenant,
            event_type=delivery.event_type,
            url=delivery.url,
            body=delivery.body,
            attempts=0,
            base=0,
            created_ms=round(time.time() * 1000),
        )
        if not self.adopt(claim):  # stopping since the change began: due again at once
            self._read.pop(claim.lease.token, None)
            release = asyncio.create_task(self.schedules.release(claim, delay_s=0))
            self._releasing.add(release)
            release.add_done_callback(self._releasing.discard)

    async def claim(self, max_items: int) -> list[Claim]:
        """Claim deliveries whose next attempt is due, and read them all in one round trip."""
        claimed = await self.schedules.claim_due("deliver", max_items)
        if claimed.next_due_s is not None:
            self.due_in(claimed.next_due_s)
        claims = claimed.claims
        if claims:
            try:
                found = await self.deliveries.get_many([c.member for c in claims])
            except (RedisError, OSError) as exc:
                # The claims stand; each `work` reads its own delivery (or fails and retries).
                self.redis_failed(exc, f"reading {len(claims)} claimed deliveries")
            else:
                self._read.update(zip((c.lease.token for c in claims), found, strict=True))
        return claims

    async def release_on_stop(self, claim: Claim) -> None:
        """Give an unfinished delivery back at shutdown, due at once."""
        self._read.pop(claim.lease.token, None)
        await super().release_on_stop(claim)

    async def work(self, claim: Claim) -> None:
        """Make one attempt at a delivery and record it."""
        token = claim.lease.token
        if token in self._read:
            delivery = self._read.pop(token)
        else:
            delivery = await self.deliveries.get(claim.member)
        if delivery is None:
            await self.schedules.release(claim, delay_s=None)
            return
        job_id_var.set(delivery.job_id)  # log lines name the job, not the delivery id
        tenant_var.set(delivery.tenant)
        host = urlsplit(delivery.url).hostname or ""
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = _HostGate(self.per_host)
        if gate.slots.locked() and gate.waiting >= self.per_host_waiting:
            await self._hand_back(claim, gate)
            return
        gate.users += 1
        try:
            if not await self._take_slot(gate):
                await self._hand_back(claim, gate)
                return
            try:
                result = await self._attempt(delivery)
            finally:
                gate.slots.release()
                gate.freed_at = time.monotonic()
        finally:
            gate.users -= 1
            if not gate.users:
                del self._gates[host]
        await self._record(delivery, claim, result)

    async def _take_slot(self, gate: _HostGate) -> bool:
        """Take one of the host's attempt slots, waiting at most `max_wait_s` for it."""
        gate.waiting += 1
        try:
            async with asyncio.timeout(self.max_wait_s):
                await gate.slots.acquire()  # a free slot is taken without yielding
        except TimeoutError:
            return False
        finally:
            gate.waiting -= 1
        return True

    async def _hand_back(self, claim: Claim, gate: _HostGate) -> None:
        """Give the delivery back for about as long as its host has gone without freeing a slot.

        A host answering quickly frees slots every few milliseconds, so the delivery is
        due again almost at once; a hanging one keeps it away for up to `HAND_BACK_MAX_S`.
        """
        stalled = time.monotonic() - gate.freed_at
        delay = min(HAND_BACK_MAX_S, max(HAND_BACK_MIN_S, stalled)) * self.rng.uniform(0.5, 1.5)
        await self.schedules.release(claim, delay_s=delay)

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
