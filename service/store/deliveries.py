"""Webhook deliveries in Redis: the delivery record, its attempt log, and re-sending.

A delivery is created by the job's state change (the outbox, see `jobs.py`)
with the event body encoded once; every attempt sends those exact bytes. Each
attempt is recorded by one script that checks the claim's fencing token,
appends to the log, and either reschedules or ends the delivery, mirroring the
state of the job's final-event delivery onto the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, cast

import msgspec
import redis.asyncio as aioredis

from service.models import DeliveryAttempt
from service.store.connection import text
from service.store.jobs import Lease
from service.store.keys import LUA_PRELUDE, Keys

_attempt_decoder = msgspec.json.Decoder(DeliveryAttempt)
_encoder = msgspec.json.Encoder()

MAX_LOG_ENTRIES = 200

_RECORD_ATTEMPT = (
    LUA_PRELUDE
    + """
local id, token, entry, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local delay_ms, retention, max_log = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('HGET', k_lease('deliver'), id) ~= token then return -1 end
redis.call('HDEL', k_lease('deliver'), id)
local dk = k_delivery(id)
if redis.call('EXISTS', dk) == 0 then
  redis.call('ZREM', k_schedule('deliver'), id)
  return -2
end
local attempts = redis.call('HINCRBY', dk, 'attempts', 1)
redis.call('HSET', dk, 'state', state)
local log = k_delivery_log(id)
redis.call('RPUSH', log, entry)
redis.call('LTRIM', log, -max_log, -1)
redis.call('EXPIRE', log, retention)
redis.call('EXPIRE', dk, retention)
if delay_ms >= 0 then
  redis.call('ZADD', k_schedule('deliver'), now_ms() + delay_ms, id)
else
  redis.call('ZREM', k_schedule('deliver'), id)
end
local jk = k_job(redis.call('HGET', dk, 'job'))
if redis.call('HGET', jk, 'wh_id') == id then
  redis.call('HSET', jk, 'wh_state', state, 'wh_attempts', attempts)
end
return attempts
"""
)

_RESEND = (
    LUA_PRELUDE
    + """
local jk = k_job(ARGV[1])
local row = redis.call('HMGET', jk, 'status', 'wh_id', 'wh_state')
if not row[1] then return -2 end
if row[1] ~= 'completed' and row[1] ~= 'failed' and row[1] ~= 'cancelled' then return 0 end
if not row[2] then return -1 end
local dk = k_delivery(row[2])
if redis.call('EXISTS', dk) == 0 then return -1 end
-- The retry schedule starts over from this attempt; the count and the log go on.
redis.call('HSET', dk, 'state', 'pending', 'base', redis.call('HGET', dk, 'attempts'))
redis.call('HSET', jk, 'wh_state', 'pending')
redis.call('ZADD', k_schedule('deliver'), now_ms(), row[2])
return 1
"""
)


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


class DeliveryStore:
    """Webhook deliveries: read, record an attempt, re-send, and the attempt log."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, retention_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_s = retention_s
        self._record = redis.register_script(_RECORD_ATTEMPT)
        self._resend = redis.register_script(_RESEND)

    async def get(self, delivery_id: str) -> Delivery | None:
        """The delivery, or None when it expired."""
        row = await self._redis.hmget(
            self._keys.delivery(delivery_id),
            ["job", "tenant", "type", "url", "body", "attempts", "base", "created"],
        )
        if row[0] is None:
            return None
        job, tenant, event_type, url, body, attempts, base, created = row
        return Delivery(
            id=delivery_id,
            job_id=text(job),
            tenant=text(tenant),
            event_type=text(event_type),
            url=text(url),
            body=cast("bytes", body),
            attempts=int(attempts or 0),
            base=int(base or 0),
            created_ms=int(created or 0),
        )

    async def record_attempt(
        self,
        delivery_id: str,
        lease: Lease,
        attempt: DeliveryAttempt,
        *,
        state: Literal["pending", "delivered", "failed"],
        retry_in_s: float | None,
    ) -> bool:
        """Append `attempt` to the log and retry after `retry_in_s`, or end the delivery.

        False when the claim was lost and nothing was written.
        """
        delay_ms = -1 if retry_in_s is None else max(0, round(retry_in_s * 1000))
        answer = await self._record(
            keys=[self._keys.prefix],
            args=[
                delivery_id,
                lease.token,
                _encoder.encode(attempt),
                state,
                delay_ms,
                self._retention_s,
                MAX_LOG_ENTRIES,
            ],
        )
        return int(answer) > 0

    async def resend(self, job_id: str) -> Resend:
        """Queue the job's final event again, with the same `webhook-id`."""
        return Resend(int(await self._resend(keys=[self._keys.prefix], args=[job_id])))

    async def log(self, delivery_id: str) -> list[DeliveryAttempt]:
        """Every attempt of the delivery, oldest first."""
        entries = await self._redis.lrange(self._keys.delivery_log(delivery_id), 0, -1)
        return [_attempt_decoder.decode(entry) for entry in entries]

    async def final_delivery_id(self, job_id: str) -> str | None:
        """The id of the job's final-event delivery, once it exists."""
        value = await self._redis.hget(self._keys.job(job_id), "wh_id")
        return text(value) if value is not None else None
