"""Webhook deliveries in Redis: the delivery record, its attempt log, and re-sending.

A delivery is created by the job's state change (the outbox, see `jobs.py`)
with the event body encoded once; every attempt sends those exact bytes. Each
attempt is recorded by one script that checks the claim's fencing token,
appends to the log, and either reschedules or ends the delivery, mirroring the
state of the job's final-event delivery onto the job.

A final event's delivery that ends `failed` enters its tenant's index of failed
deliveries (`Keys.failed_deliveries`), scored by when its job finished (Redis
clock); it leaves it when it is re-sent, delivered or skipped, all in the same
scripts. Recovery (`recover`) reads that index for a window and re-queues what
it finds into the normal `deliver` schedule, where the dispatcher paces it like
any other delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, cast

import msgspec
import redis.asyncio as aioredis

from service.models import FINAL_STATUSES, DeliveryAttempt, response_excerpt
from service.store.activity import LUA_ACTIVITY
from service.store.connection import text
from service.store.jobs import Lease, decode_record, event_body, job_of_delivery
from service.store.keys import LUA_NOW, Keys

# A log entry is an attempt as a JSON object, one a line: a field added to DeliveryAttempt
# (with a default) never breaks the entries already stored.
_entry_decoder = msgspec.json.Decoder(DeliveryAttempt)
_encoder = msgspec.json.Encoder()

MAX_LOG_ENTRIES = 50
"""The attempt log keeps the latest attempts; the job's `webhook.attempts` counts them all."""

# KEYS: the hash holding the delivery (its job for a final event, else its own), the
# deliver lease, the deliver schedule, the tenant's failed deliveries, the activity counts.
# ARGV: delivery id, token, log entry, state, delay_ms (-1: done), retention_s, log size,
# '1' for a final event's delivery, its job id.
_RECORD_ATTEMPT = (
    LUA_NOW
    + LUA_ACTIVITY
    + """
local holder, lease, deliver, failed, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, token, entry, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local delay_ms, retention, max_log = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('HGET', lease, id) ~= token then return -1 end
redis.call('HDEL', lease, id)
if redis.call('HGET', holder, 'webhook_id') ~= id then
  redis.call('ZREM', deliver, id)
  return -2
end
local attempts = redis.call('HINCRBY', holder, 'webhook_attempts', 1)
-- The log with `entry` appended, its oldest entries dropped beyond `max_log`.
local log = (redis.call('HGET', holder, 'attempt_log') or '') .. entry .. '\\n'
local _, lines = string.gsub(log, '\\n', '')
while lines > max_log do
  log = string.sub(log, string.find(log, '\\n', 1, true) + 1)
  lines = lines - 1
end
redis.call('HSET', holder, 'webhook_state', state, 'attempt_log', log)
if ARGV[8] ~= '1' then
  -- Only a final event can be sent again: another's body goes once it is done.
  if state ~= 'pending' then redis.call('HDEL', holder, 'event_zlib') end
  redis.call('EXPIRE', holder, retention)
end
if delay_ms >= 0 then
  redis.call('ZADD', deliver, now_ms() + delay_ms, id)
else
  redis.call('ZREM', deliver, id)
end
if ARGV[8] == '1' and state ~= 'pending' then
  local now = now_ms()
  if state == 'failed' then
    local finished = tonumber(redis.call('HGET', holder, 'webhook_created_ms') or now)
    redis.call('ZADD', failed, finished, ARGV[9])
    -- Jobs past their retention are gone: their entries go too, so the index stays bounded.
    redis.call('ZREMRANGEBYSCORE', failed, '-inf', now - retention * 1000)
  else
    redis.call('ZREM', failed, ARGV[9])
  end
  if state ~= 'skipped' then
    count_activity(activity, state == 'failed' and 'delivery_failed' or 'delivered', 1, now)
  end
end
return attempts
"""
)

# KEYS: the job, the deliver schedule, its tenant's failed deliveries. ARGV: the job id.
_RESEND = (
    LUA_NOW
    + """
local job, deliver, failed = KEYS[1], KEYS[2], KEYS[3]
local row = redis.call('HMGET', job, 'status', 'webhook_id', 'webhook_attempts')
local s = row[1]
if not s then return -2 end
if s ~= 'completed' and s ~= 'failed' and s ~= 'cancelled' then return 0 end
if not row[2] then return -1 end
-- The retry schedule starts over from this attempt; the count and the log go on.
redis.call('HSET', job, 'webhook_state', 'pending', 'webhook_base', row[3] or 0)
redis.call('ZADD', deliver, now_ms(), row[2])
redis.call('ZREM', failed, ARGV[1])
return 1
"""
)

# Re-queues failed final-event deliveries, each once: one that is still `failed` goes back
# to `pending`, its retry schedule started over, due `spacing_ms` after the one queued
# before it (the first of the recovery `start` places after now); every job named leaves
# the index (one gone or already re-sent has nothing to recover). KEYS: the tenant's failed
# deliveries, the deliver schedule, then each job. ARGV: spacing_ms, start, then the job
# ids in KEYS' order. The answer: how many were re-queued.
_RECOVER = (
    LUA_NOW
    + """
local failed, deliver = KEYS[1], KEYS[2]
local spacing, start = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, queued = now_ms(), 0
for i = 3, #ARGV do
  local id, job = ARGV[i], KEYS[i]
  local row = redis.call('HMGET', job, 'webhook_state', 'webhook_id', 'webhook_attempts')
  if row[1] == 'failed' and row[2] then
    redis.call('HSET', job, 'webhook_state', 'pending', 'webhook_base', row[3] or 0)
    redis.call('ZADD', deliver, now + (start + queued) * spacing, row[2])
    queued = queued + 1
  end
  redis.call('ZREM', failed, id)
end
return queued
"""
)

RECOVER_BATCH: Final = 200
"""Jobs one recovery script call looks at: each call is short, whatever the window holds."""
RECOVER_SPACING_MS: Final = 2
"""Recovered deliveries fall due this far apart (500 over a second): a large recovery
enters the schedule as a stream, not a wall the dispatcher must claim and hand back
whole, and other tenants' new webhooks, due meanwhile, are claimed first."""


class Resend(Enum):
    """What `POST /v1/jobs/{id}/deliveries` came to."""

    QUEUED = 1
    NOT_FINAL = 0
    NO_WEBHOOK = -1
    GONE = -2


@dataclass(frozen=True)
class Delivery:
    """A delivery as the dispatcher needs it."""

    id: str
    job_id: str
    tenant: str
    event_type: str
    url: str
    body: bytes
    attempts: int
    base: int
    created_ms: int

    @property
    def attempts_since_resend(self) -> int:
        """Attempts made since the schedule last started (creation or a re-send)."""
        return self.attempts - self.base


def _is_final(event: str) -> bool:
    return event.removeprefix("job.") in FINAL_STATUSES


_DELIVERY_FIELDS: Final = (
    "webhook_id",
    "webhook_attempts",
    "webhook_base",
    "webhook_created_ms",
    "event_zlib",
)


def _delivery(
    delivery_id: str, fields: list[bytes | None], record_json: bytes | None
) -> Delivery | None:
    """A delivery from its `_DELIVERY_FIELDS` and its job's record."""
    stored_id, attempts, base, created_ms, body = fields
    if record_json is None or body is None or stored_id != delivery_id.encode():
        return None
    record = decode_record(record_json)
    if record.webhook is None:
        return None
    job_id, event = job_of_delivery(delivery_id)
    return Delivery(
        id=delivery_id,
        job_id=job_id,
        tenant=record.tenant,
        event_type=event,
        url=record.webhook.url,
        body=event_body(body),
        attempts=int(attempts or 0),
        base=int(base or 0),
        created_ms=int(created_ms or 0),
    )


class DeliveryStore:
    """Webhook deliveries: read, record an attempt, re-send, and the attempt log."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, retention_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_s = retention_s
        self._record = redis.register_script(_RECORD_ATTEMPT)
        self._resend = redis.register_script(_RESEND)
        self._recover = redis.register_script(_RECOVER)

    async def get(self, delivery_id: str) -> Delivery | None:
        """The delivery, or None when it expired."""
        [delivery] = await self.get_many([delivery_id])
        return delivery

    async def get_many(self, delivery_ids: list[str]) -> list[Delivery | None]:
        """Several deliveries in one round trip, None where one expired."""
        if not delivery_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for delivery_id in delivery_ids:
                job_id, _ = job_of_delivery(delivery_id)
                pipe.hmget(self._holder(delivery_id), _DELIVERY_FIELDS)
                pipe.hget(self._keys.job(job_id), "record")
            rows = await pipe.execute()
        return [
            _delivery(delivery_id, rows[2 * i], rows[2 * i + 1])
            for i, delivery_id in enumerate(delivery_ids)
        ]

    def _holder(self, delivery_id: str) -> str:
        """The hash a delivery lives in: its job's for a final event, else its own."""
        job_id, event = job_of_delivery(delivery_id)
        return self._keys.job(job_id) if _is_final(event) else self._keys.delivery(delivery_id)

    async def record_attempt(
        self,
        delivery_id: str,
        lease: Lease,
        attempt: DeliveryAttempt,
        *,
        tenant: str,
        state: Literal["pending", "delivered", "failed", "skipped"],
        retry_in_s: float | None,
    ) -> bool:
        """Append `attempt` to the log and retry after `retry_in_s`, or end the delivery.

        The log keeps the latest `MAX_LOG_ENTRIES` attempts, each with at most
        `MAX_EXCERPT_BYTES` of the answer, so one job stays well under 256 KB.

        False when the claim was lost and nothing was written.
        """
        delay_ms = -1 if retry_in_s is None else max(0, round(retry_in_s * 1000))
        # Bounded here, whatever the caller read: a receiver never grows a job past its cap.
        attempt = msgspec.structs.replace(
            attempt, response_excerpt=response_excerpt(attempt.response_excerpt)
        )
        job_id, event = job_of_delivery(delivery_id)
        names = [
            self._holder(delivery_id),
            self._keys.lease("deliver"),
            self._keys.schedule("deliver"),
            self._keys.failed_deliveries(tenant),
            self._keys.activity(),
        ]
        args: list[str | bytes | int] = [
            delivery_id,
            lease.token,
            _encoder.encode(attempt),
            state,
            delay_ms,
            self._retention_s,
            MAX_LOG_ENTRIES,
            int(_is_final(event)),
            job_id,
        ]
        answer = await self._record(keys=names, args=args)
        return int(answer) > 0

    async def resend(self, job_id: str, tenant: str) -> Resend:
        """Queue the job (of `tenant`)'s final event again, with the same `webhook-id`."""
        names = [
            self._keys.job(job_id),
            self._keys.schedule("deliver"),
            self._keys.failed_deliveries(tenant),
        ]
        return Resend(int(await self._resend(keys=names, args=[job_id])))

    async def recover(self, tenant: str, *, since_ms: int, until_ms: int | None) -> int:
        """Re-queue the tenant's failed final deliveries of jobs finished in the window.

        The window is inclusive, in ms since the epoch; `until_ms=None` has no end.
        Each is queued once, in the normal delivery schedule, `RECOVER_SPACING_MS` after
        the one before (the dispatcher's per-tenant and per-host limits pace them from
        there); the answer is how many were queued.
        """
        index = self._keys.failed_deliveries(tenant)
        until: int | str = "+inf" if until_ms is None else until_ms
        queued = 0
        while True:
            found = cast(
                "list[bytes]",
                await self._redis.zrangebyscore(index, since_ms, until, 0, RECOVER_BATCH),
            )
            if not found:
                return queued
            job_ids = [text(job_id) for job_id in found]
            names = [index, self._keys.schedule("deliver")]
            names += [self._keys.job(job_id) for job_id in job_ids]
            # Each call takes the jobs it looked at out of the index: the loop always ends.
            args: list[int | str] = [RECOVER_SPACING_MS, queued, *job_ids]
            queued += int(await self._recover(keys=names, args=args))

    async def failed(self, tenant: str, limit: int) -> list[tuple[str, int]]:
        """The tenant's latest failed final deliveries: `(job id, finished ms)`, newest first."""
        found = cast(
            "list[tuple[bytes, float]]",
            await self._redis.zrevrange(
                self._keys.failed_deliveries(tenant), 0, limit - 1, withscores=True
            ),
        )
        return [(text(job_id), int(score)) for job_id, score in found]

    async def failed_counts(self, tenants: list[str]) -> dict[str, int]:
        """How many failed final deliveries each tenant has in its index."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zcard(self._keys.failed_deliveries(tenant))
            counts = await pipe.execute()
        return dict(zip(tenants, (int(n) for n in counts), strict=True))

    async def log(self, delivery_id: str) -> list[DeliveryAttempt]:
        """Every attempt of the delivery, oldest first."""
        stored_id, lines = await self._redis.hmget(
            self._holder(delivery_id), ["webhook_id", "attempt_log"]
        )
        if stored_id != delivery_id.encode() or not lines:
            return []
        return [_entry_decoder.decode(line) for line in lines.splitlines()]

    async def final_delivery_id(self, job_id: str) -> str | None:
        """The id of the job's final-event delivery, once it exists."""
        stored_id = await self._redis.hget(self._keys.job(job_id), "webhook_id")
        return None if stored_id is None else text(stored_id)
