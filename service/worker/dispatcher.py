"""The dispatcher: delivers webhook events, signed, retried on the schedule, logged.

Each attempt sends the exact bytes encoded when the job changed state, with a
fresh `webhook-timestamp` and signature (receivers check the timestamp within
±5 minutes) and the same `webhook-id`.

One slow or dead receiver never delays the others, nor one tenant another's.
`AttemptSlots` counts what runs: a tenant has at most `per_tenant` attempts at
once (its share of the dispatcher's `concurrency`, however many hosts its URLs
name), and at most `per_destination` of them at one host:port. A delivery that
finds its tenant's share or its destination full is not held: it is handed back
to the schedule for about as long as it will wait for a slot (`HandBacks`), so
the deliveries a dispatcher holds are the attempts it is making, and a crowd of
deliveries to one slow endpoint (a recovery of hundreds) is not claimed and
handed back again every few milliseconds, at the other tenants' expense.
Every limit is per worker process.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final, Literal, NamedTuple
from urllib.parse import urlsplit

import httpx
from redis.exceptions import RedisError

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

CONCURRENCY = 256  # deliveries in hand: attempts, and those being read or handed back
PER_TENANT = CONCURRENCY // 4  # a tenant's share: whatever it hangs, the others keep 3/4
PER_DESTINATION = 16  # one tenant's attempts at one host:port; its other ports have their own
HAND_BACK_MIN_S = 0.02
HAND_BACK_MAX_S = 1.5

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class Destination(NamedTuple):
    """Where one tenant's webhooks go: a host and port (the scheme's when the URL names none)."""

    tenant: str
    host: str
    port: int | None

    @classmethod
    def of(cls, tenant: str, url: str) -> Destination:
        """The destination of a delivery of `tenant` to `url`."""
        parts = urlsplit(url)
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        except ValueError:  # not a port: the attempt itself reports invalid_url
            port = None
        return cls(tenant, parts.hostname or "", port)


@dataclass
class _InUse:
    count: int = 0
    freed_at: float = field(default_factory=time.monotonic)  # or when its first slot was taken


class AttemptSlots:
    """Which attempts may start: each tenant within its share, each destination within its slots.

    Taking a slot never waits; a caller that gets none gives its delivery back.
    """

    def __init__(self, *, per_tenant: int, per_destination: int) -> None:
        self.per_tenant = per_tenant
        self.per_destination = per_destination
        # A tenant's share by its id, a destination's slots by the destination; dropped at 0.
        self._in_use: dict[str | Destination, _InUse] = {}

    def take(self, destination: Destination) -> bool:
        """Take a slot for one attempt; False, taking none, when tenant or destination is full."""
        if self._full(destination):
            return False
        for key, _ in self._limits(destination):
            self._in_use.setdefault(key, _InUse()).count += 1
        return True

    def give_back(self, destination: Destination) -> None:
        """Free the slot an attempt at `destination` took."""
        now = time.monotonic()
        for key, _ in self._limits(destination):
            in_use = self._in_use[key]
            in_use.count -= 1
            in_use.freed_at = now
            if not in_use.count:
                del self._in_use[key]

    def stalled_s(self, destination: Destination) -> float:
        """How long what keeps `destination` full has gone without freeing a slot (0 if nothing)."""
        now = time.monotonic()
        return max((now - in_use.freed_at for in_use in self._full(destination)), default=0.0)

    def _limits(self, destination: Destination) -> tuple[tuple[str | Destination, int], ...]:
        return ((destination.tenant, self.per_tenant), (destination, self.per_destination))

    def _full(self, destination: Destination) -> list[_InUse]:
        found = ((self._in_use.get(key), limit) for key, limit in self._limits(destination))
        return [in_use for in_use, limit in found if in_use is not None and in_use.count >= limit]


class HandBacks:
    """How long a delivery that found its destination full should stay away.

    About as long as it would wait for a slot: the deliveries handed back to
    that destination lately (this one included) times its recent attempt
    duration, shared among its slots; at least as long as the limit has gone
    without freeing a slot (a hanging receiver), within [min_s, max_s].
    """

    def __init__(self, *, per_destination: int, min_s: float, max_s: float) -> None:
        self.per_destination = per_destination
        self.min_s = min_s
        self.max_s = max_s
        self._waiting: dict[Destination, dict[str, float]] = {}  # member -> when handed back
        self._attempt_s: dict[Destination, float] = {}  # a moving average of attempt durations

    def attempted(self, destination: Destination, member: str, seconds: float) -> None:
        """Note an attempt at `destination` that took `seconds`; `member` waits no more."""
        previous = self._attempt_s.get(destination, seconds)
        self._attempt_s[destination] = 0.8 * previous + 0.2 * seconds
        self._forget(destination, member)

    def delay_s(self, destination: Destination, member: str, stalled_s: float) -> float:
        """How long `member`, finding `destination` full now, should stay away (unjittered)."""
        now = time.monotonic()
        waiting = self._waiting.setdefault(destination, {})
        for old in [m for m, at in waiting.items() if now - at > 2 * self.max_s]:
            del waiting[old]  # claimed by another worker since, or gone
        waiting[member] = now
        queued_s = len(waiting) * self._attempt_s.get(destination, 0.0) / self.per_destination
        return min(self.max_s, max(self.min_s, stalled_s, queued_s))

    def _forget(self, destination: Destination, member: str) -> None:
        waiting = self._waiting.get(destination)
        if waiting is not None:
            waiting.pop(member, None)
            if not waiting:
                del self._waiting[destination]
                self._attempt_s.pop(destination, None)


class Dispatcher(ClaimLoop):
    """Claims due deliveries and makes one attempt at each."""

    name = "dispatcher"

    def __init__(
        self,
        settings: Settings,
        deliveries: DeliveryStore,
        schedules: Schedules,
        client: httpx.AsyncClient,
        heartbeat: Heartbeat,
        *,
        metrics: WorkerMetrics | None = None,
        concurrency: int = CONCURRENCY,
        per_tenant: int = PER_TENANT,
        per_destination: int = PER_DESTINATION,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= per_destination <= per_tenant < concurrency:
            raise ValueError("need 1 <= per_destination <= per_tenant < concurrency")
        super().__init__(
            schedules,
            heartbeat,
            concurrency=concurrency,
            drain_s=settings.shutdown_s,
            rng=rng,
        )
        self.settings = settings
        self.deliveries = deliveries
        self.client = client
        self.slots = AttemptSlots(per_tenant=per_tenant, per_destination=per_destination)
        self.hand_backs = HandBacks(
            per_destination=per_destination, min_s=HAND_BACK_MIN_S, max_s=HAND_BACK_MAX_S
        )
        self.metrics = metrics
        # The deliveries of claimed items, read together when claimed and taken by `work`.
        self._read: dict[str, Delivery | None] = {}  # by the claim's fencing token

    async def claim(self, max_items: int) -> list[Claim]:
        """Claim deliveries whose next attempt is due, and read them all in one round trip."""
        claims = await self.schedules.claim("deliver", max_items)
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
        if delivery.tenant not in self.settings.tenants.by_id:
            # Removed from the tenants file: nothing can sign its events any more.
            removed = AttemptResult(status_code=None, latency_ms=0, error="tenant_removed")
            await self._record(delivery, claim, removed, skip=True)
            return
        destination = Destination.of(delivery.tenant, delivery.url)
        if not self.slots.take(destination):
            await self._hand_back(claim, destination)
            return
        try:
            result = await self._attempt(delivery)
        finally:
            self.slots.give_back(destination)
        self.hand_backs.attempted(destination, delivery.id, result.latency_ms / 1000)
        await self._record(delivery, claim, result)

    async def _hand_back(self, claim: Claim, destination: Destination) -> None:
        """Give the delivery back for about as long as it would wait for a slot (`HandBacks`).

        A receiver answering quickly with few deliveries queued frees slots every few
        milliseconds, so the delivery is due again almost at once; a hanging one, or a
        crowd queued at a slow one, keeps it away for up to `HAND_BACK_MAX_S`.
        """
        stalled = self.slots.stalled_s(destination)
        delay = self.hand_backs.delay_s(destination, claim.member, stalled)
        await self.schedules.release(claim, delay_s=delay * self.rng.uniform(0.5, 1.5))

    async def _attempt(self, delivery: Delivery) -> AttemptResult:
        tenant = self.settings.tenants.by_id.get(delivery.tenant)
        if tenant is None:  # removed while the attempt waited for a slot: next time it is skipped
            return AttemptResult(status_code=None, latency_ms=0, error="tenant_removed")
        # The tenants file may have changed since the job was accepted.
        if callback_url_problem(delivery.url, tenant.callback_hosts) is not None:
            return AttemptResult(status_code=None, latency_ms=0, error="invalid_url")
        headers = webhook_headers(
            tenant.webhook_secrets, delivery.id, int(time.time()), delivery.body
        )
        return await deliver_once(
            self.client,
            delivery.url,
            headers,
            delivery.body,
            deadline_s=self.settings.webhook_deadline_s,
        )

    async def _record(
        self, delivery: Delivery, claim: Claim, result: AttemptResult, *, skip: bool = False
    ) -> None:
        verdict = outcome(result)
        retry_in: float | None = None
        state: Literal["pending", "delivered", "failed", "skipped"]
        if skip:
            state = "skipped"
        elif verdict == "delivered":
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
            self.metrics.webhook_attempt(result.error or "delivered", since_event, delivery.tenant)
        recorded = await self.deliveries.record_attempt(
            delivery.id,
            claim.lease,
            attempt,
            tenant=delivery.tenant,
            state=state,
            retry_in_s=retry_in,
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
